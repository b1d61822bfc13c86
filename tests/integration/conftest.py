"""Fixtures shared by the integration tests that run a Celery worker."""

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
