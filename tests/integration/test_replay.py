"""Replay: failed events back in the queue, from Python and from `outbox_replay`."""

from __future__ import annotations

import datetime
import re

import pytest
from django.core.management import call_command
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from event_stream.management.commands.outbox_replay import Command
from event_stream.models import Outbox
from event_stream.replay import replay_failed
from tests.integration.test_status import run_against_a_closed_port

pytestmark = pytest.mark.django_db

NOW = timezone.now()


def add(event_type="issue.updated", *, failed_days_ago=None, processed=False) -> Outbox:
    failed_at = None if failed_days_ago is None else NOW - datetime.timedelta(days=failed_days_ago)
    return Outbox.objects.create(
        event_type=event_type,
        entity_type="issue",
        payload={},
        processed_at=NOW if processed else None,
        failed_at=failed_at,
        attempts=10 if failed_at else 0,
        available_at=NOW + datetime.timedelta(hours=1),
        last_error="handler: RuntimeError: boom" if failed_at else None,
    )


@pytest.fixture
def rows():
    return {
        "failed_old": add(failed_days_ago=10),
        "failed_new": add(failed_days_ago=1),
        "failed_by_celery": add("cycle.created", failed_days_ago=2, processed=True),
        "pending": add(),
        "processed": add(processed=True),
    }


def state(row: Outbox) -> str:
    row.refresh_from_db()
    return row.state


def test_a_replayed_row_is_pending_again(rows):
    row = rows["failed_by_celery"]
    before = timezone.now()
    assert replay_failed(ids=[row.id]) == 1
    row.refresh_from_db()
    assert (row.processed_at, row.failed_at, row.attempts) == (None, None, 0)
    assert before <= row.available_at <= timezone.now()
    assert row.last_error == "handler: RuntimeError: boom"  # the record of what happened
    assert Outbox.objects.pending().filter(id=row.id).exists()


def test_only_failed_rows_are_touched(rows):
    ids = [r.id for r in rows.values()]
    assert replay_failed(ids=ids) == 3
    assert state(rows["processed"]) == "processed"
    assert rows["processed"].processed_at == NOW
    assert Outbox.objects.get(id=rows["pending"].id).available_at > timezone.now()


def test_filters(rows):
    assert replay_failed(event_type="cycle.created") == 1
    assert state(rows["failed_by_celery"]) == "pending"
    assert replay_failed(since=NOW - datetime.timedelta(days=5)) == 1
    assert state(rows["failed_new"]) == "pending"
    assert state(rows["failed_old"]) == "failed"
    assert replay_failed(until=NOW - datetime.timedelta(days=5)) == 1
    assert Outbox.objects.failed().count() == 0


def test_all(rows):
    assert replay_failed(all=True) == 3
    assert Outbox.objects.failed().count() == 0


def test_no_selection_is_refused(rows):
    with pytest.raises(ValueError, match="say which failed events"):
        replay_failed()
    with pytest.raises(ValueError):
        replay_failed(ids=[])


@pytest.fixture
def run_from_argv(monkeypatch):
    """The command as from a shell (stderr, exit status), in the test's transaction."""
    from django.db import connections

    # run_from_argv closes every connection when it ends, the test's included
    monkeypatch.setattr(connections, "close_all", lambda: None)
    return lambda *argv: Command().run_from_argv(["manage.py", "outbox_replay", *argv])


class TestCommand:
    def test_by_id(self, rows, capsys):
        call_command("outbox_replay", "--id", str(rows["failed_old"].id))
        assert capsys.readouterr().out.strip() == "replayed 1 failed event(s)"
        assert state(rows["failed_old"]) == "pending"

    def test_by_type_and_time(self, rows, capsys):
        since = (NOW - datetime.timedelta(days=3)).isoformat()
        call_command("outbox_replay", "--type", "issue.updated", "--since", since)
        assert "replayed 1 failed event(s)" in capsys.readouterr().out
        assert state(rows["failed_new"]) == "pending"
        call_command(
            "outbox_replay", "--until", (NOW - datetime.timedelta(days=5)).date().isoformat()
        )
        assert state(rows["failed_old"]) == "pending"

    def test_all(self, rows, capsys):
        call_command("outbox_replay", "--all")
        assert "replayed 3 failed event(s)" in capsys.readouterr().out

    @pytest.mark.parametrize(
        "argv, message",
        [
            ([], "say what to replay"),
            (["--id", "abc"], "--id: must be a positive integer, got 'abc'"),
            (["--id", "0"], "--id: must be a positive integer"),
            (["--since", "yesterday"], "--since: not an ISO 8601 date or date-time: 'yesterday'"),
            (["--until", "2025-13-45"], "--until: not an ISO 8601"),
            (["--since", "2025-02-01", "--until", "2025-01-01"], "--since must not be after"),
            (["--all", "--type", "x"], "--all replays every failed event"),
            (["--type", " "], "--type: must not be empty"),
        ],
    )
    def test_bad_input_is_one_line_and_exit_status_2(
        self, rows, capsys, run_from_argv, argv, message
    ):
        with pytest.raises(SystemExit) as exit_info:
            run_from_argv(*argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
        assert Outbox.objects.failed().count() == 3

    def test_an_unknown_flag_exits_2(self, capsys, run_from_argv):
        with pytest.raises(SystemExit) as exit_info:
            run_from_argv("--everything")
        assert exit_info.value.code == 2
        assert "unrecognized arguments: --everything" in capsys.readouterr().err


class TestLargeReplays:
    """Millions of failed rows: a chunk of ids at a time, each its own short UPDATE."""

    def updates(self, queries) -> list[str]:
        return [q["sql"] for q in queries if q["sql"].startswith("UPDATE")]

    def test_a_replay_by_filter_updates_a_chunk_at_a_time(self):
        failed = [add(failed_days_ago=days) for days in (5, 4, 3, 2, 1)]
        with CaptureQueriesContext(connection) as queries:
            assert replay_failed(all=True, chunk_size=2) == 5
        updates = self.updates(queries)
        assert len(updates) == 3, updates
        assert all(len(re.findall(r"\d+", u.split(" IN (")[1].split(")")[0])) <= 2 for u in updates)
        assert {state(row) for row in failed} == {"pending"}

    def test_a_replay_by_ids_updates_a_chunk_at_a_time(self, rows):
        ids = [r.id for r in rows.values()] + [999_999]
        with CaptureQueriesContext(connection) as queries:
            assert replay_failed(ids=ids, chunk_size=2) == 3
        # six ids, two per chunk; the last chunk (processed, 999999) holds no failed row
        assert len(self.updates(queries)) == 2
        assert state(rows["processed"]) == "processed"


class TestCommandOnRowsThatAreNotFailed:
    def test_ids_not_replayed_are_named_and_the_exit_status_is_1(self, rows, capsys, run_from_argv):
        argv = ["--id", str(rows["failed_old"].id), "--id", str(rows["processed"].id)]
        argv += ["--id", str(rows["pending"].id), "--id", "999999"]
        with pytest.raises(SystemExit) as exit_info:
            run_from_argv(*argv)
        assert exit_info.value.code == 1
        captured = capsys.readouterr()
        assert captured.out.strip() == "replayed 1 failed event(s)"
        assert captured.err.count("\n") == 1
        assert (
            f"not replayed: #{rows['pending'].id} (pending), #{rows['processed'].id} (processed), "
            f"#999999 (no such event)" in captured.err
        )
        assert state(rows["failed_old"]) == "pending"
        assert state(rows["processed"]) == "processed"

    def test_a_failed_id_left_out_by_a_filter_is_named(self, rows, capsys, run_from_argv):
        row = rows["failed_by_celery"]  # cycle.created
        with pytest.raises(SystemExit) as exit_info:
            run_from_argv("--id", str(row.id), "--type", "issue.updated")
        assert exit_info.value.code == 1
        assert "(failed, but not selected by --type/--since/--until)" in capsys.readouterr().err
        assert state(row) == "failed"


@pytest.mark.django_db(False)
def test_a_database_that_does_not_answer_is_one_line_and_exit_status_1():
    result = run_against_a_closed_port("outbox_replay", "--all")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("CommandError: database unavailable: "), result.stderr
