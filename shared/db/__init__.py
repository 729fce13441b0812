"""The relational database port: MySQL in production, SQLite standalone.

from shared.db import open_database, translate_errors, DuplicateKeyError
from shared.db import schema

db = await open_database(settings.db_url)
await db.migrate()
async with db.transaction() as conn:
    await conn.execute(schema.users.insert().values(...))
"""

from shared.db.database import (
    Database,
    alembic_config,
    open_database,
    reads_on_primary,
    translate_errors,
)
from shared.db.errors import DatabaseUnavailableError, DuplicateKeyError
from shared.db.ids import new_id
from shared.db.schema import UtcDateTime, metadata

__all__ = [
    "Database",
    "DatabaseUnavailableError",
    "DuplicateKeyError",
    "UtcDateTime",
    "alembic_config",
    "metadata",
    "new_id",
    "open_database",
    "reads_on_primary",
    "translate_errors",
]
