"""SQLAlchemy Core access to the tables the scheduler owns; frozen dataclasses out."""
