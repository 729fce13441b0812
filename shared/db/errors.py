"""What the database port raises instead of driver errors.

Both are plain exceptions, not ``AppError``: a repository knows what a duplicate means
("username taken" → ``ConflictError``), and the web layer decides how an outage is shown
(``shared.web.unavailable("database")``).
"""

from __future__ import annotations


class DuplicateKeyError(Exception):
    """An insert or update broke a primary-key or unique constraint."""


class DatabaseUnavailableError(Exception):
    """The database cannot be reached or cannot serve the statement now; retrying may work."""
