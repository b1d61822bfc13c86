"""Fixtures shared by the integration tests."""

from __future__ import annotations

import pytest

from tests.integration.celery_support import database_url, redis_url_for_tests


@pytest.fixture(scope="module")
def broker_url():
    return redis_url_for_tests()


@pytest.fixture(scope="module")
def test_database_url(django_db_setup, django_db_blocker):
    """DATABASE_URL of the test database, for the module's worker and relay processes."""
    from django.db import connection

    return database_url(connection.settings_dict)


@pytest.fixture
def project():
    """A workspace and project to write issues in, with the outbox emptied of their events."""
    from event_stream.models import Outbox
    from tests.integration.factories import make_project

    project = make_project()
    Outbox.objects.all().delete()
    return project


@pytest.fixture
def conn(conninfo):
    """An autocommit psycopg connection to the test database, its outbox emptied (ids from 1)."""
    import psycopg

    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("TRUNCATE outbox RESTART IDENTITY")
        yield conn
