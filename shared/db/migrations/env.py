"""Alembic environment: runs on a connection handed in by ``shared.db.Database``.

There is no ``alembic.ini`` and no URL here: ``Database.migrate`` builds the ``Config``,
takes the migration lock and opens the transaction, then passes its connection in
``config.attributes["connection"]``. Operators run ``python -m shared.db migrate``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from shared.db.schema import metadata

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection) or context.is_offline_mode():
    raise RuntimeError(
        "vod migrations run through shared.db (python -m shared.db migrate), "
        "which passes the connection in; alembic's command line is not set up for them"
    )

context.configure(
    connection=connection,
    target_metadata=metadata,
    # SQLite cannot ALTER most things: batch mode copies the table instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
