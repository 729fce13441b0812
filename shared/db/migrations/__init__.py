"""Alembic migrations of the vod schema (a package so that installs ship them)."""
