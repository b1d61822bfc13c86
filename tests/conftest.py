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
    from django.db import connection

    from tests.integration.celery_support import database_url as url_of

    return url_of(connection.settings_dict)
