"""Errors the event stream's commands report in one line."""

from __future__ import annotations

from django.core.management.base import CommandError


def database_unavailable(exc: Exception) -> CommandError:
    """A database that does not answer, as one line and exit status 1 (not a traceback)."""
    # psycopg's messages add hints on further lines; the first says what happened.
    first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return CommandError(f"database unavailable: {first_line}", returncode=1)
