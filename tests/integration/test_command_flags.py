"""A flag the commands do not know stops them with one line and exit status 2, as a bad value
does: never a guess at what was meant, never argparse's usage block before the error.

Left to itself, argparse takes a prefix for the whole flag: `outbox_poller --batch 0` would run
as `--batch-size 0`, and `outbox_replay --al` would replay every failed event."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from event_stream.settings import RELAY_OPTIONS
from tests.integration.celery_support import ROOT

# django_db: the test database must exist for the subprocesses, though a refused flag never
# reaches it (an abbreviation taken for a flag would run the command on it).
pytestmark = [pytest.mark.slow, pytest.mark.django_db]


def manage(database_url, *argv):
    """`python manage.py ...` as from a shell, on the test database (never the embedded one)."""
    return subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=ROOT,
        env={**os.environ, "DATABASE_URL": database_url, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("command", "args", "problem"),
    [
        ("outbox_poller", ["--batch", "0"], "unrecognized arguments: --batch 0"),
        ("outbox_poller", ["--interval", "5"], "unrecognized arguments: --interval 5"),
        ("outbox_poller", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("outbox_poller", ["--batch-size"], "argument --batch-size: expected one argument"),
        ("outbox_poller", ["--no-such\nflag"], "unrecognized arguments: --no-such\\nflag"),
        ("outbox_replay", ["--al"], "unrecognized arguments: --al"),
        ("outbox_replay", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        ("outbox_replay", ["--id"], "argument --id: expected one argument"),
        ("outbox_status", ["--verb", "2"], "unrecognized arguments: --verb 2"),
        ("outbox_status", ["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    ],
)
def test_a_bad_flag_stops_the_command_with_one_line_naming_it(command, args, problem, database_url):
    result = manage(database_url, command, *args)

    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"manage.py {command}: error: {problem}"), lines[0]


def test_a_flag_written_with_equals_is_still_read_whole(database_url):
    # No abbreviations must not cost `--flag=value`: the value reaches the relay's own check.
    result = manage(database_url, "outbox_poller", "--batch-size=0")

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        "CommandError: --batch-size: must be an integer from 1 to 10000, got '0'"
    )


@pytest.mark.parametrize(
    ("command", "flags"),
    [
        ("outbox_poller", [option.flag for option in RELAY_OPTIONS]),
        ("outbox_replay", ["--id", "--all", "--type", "--since", "--until"]),
        ("outbox_status", ["--verbosity"]),
    ],
)
def test_help_still_lists_every_flag(command, flags, database_url):
    result = manage(database_url, command, "--help")

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"usage: manage.py {command} ")
    missing = [flag for flag in flags if f" {flag} " not in result.stdout]
    assert not missing, result.stdout


@pytest.mark.parametrize(
    ("command", "args"),
    [
        ("outbox_poller", ["--batch", "0"]),
        ("outbox_replay", ["--al"]),
        ("outbox_status", ["--verb", "2"]),
    ],
)
def test_call_command_refuses_an_abbreviation_with_command_error(command, args):
    # From code, Django's way stands: a CommandError to catch, no exit, nothing printed.
    with pytest.raises(CommandError, match=f"^Error: unrecognized arguments: {args[0]}"):
        call_command(command, *args)
