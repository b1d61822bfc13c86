"""Shared fixtures. Integration tests use the real PostgreSQL named by DATABASE_URL (unset: the
embedded server), in a test database that pytest-django creates and drops."""

from __future__ import annotations

import pytest


@pytest.fixture
def conninfo(django_db_setup, django_db_blocker):
    """libpq keywords for the test database, for raw psycopg connections and child processes."""
    from django.db import connection

    from event_stream.database import conninfo_from_django

    with django_db_blocker.unblock():
        return conninfo_from_django(connection.settings_dict)


@pytest.fixture
def database_url(django_db_setup, django_db_blocker):
    """DATABASE_URL of the test database, for child processes (relays, workers)."""
    from urllib.parse import quote

    from django.db import connection

    s = connection.settings_dict
    host = quote(str(s.get("HOST") or "127.0.0.1"), safe="")
    port = s.get("PORT") or 5432
    password = f":{quote(s['PASSWORD'], safe='')}" if s.get("PASSWORD") else ""
    return f"postgresql://{s.get('USER') or 'postgres'}{password}@{host}:{port}/{s['NAME']}"
