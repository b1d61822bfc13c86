"""Capture on the real PostgreSQL: one correct outbox row per change, in the same transaction."""

from __future__ import annotations

import datetime
import uuid

import psycopg
import pytest
from django.contrib.auth.models import User
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from event_stream.capture import NOTIFY_CHANNEL, WAKEUP_LOCK, updated_func
from event_stream.models import Outbox
from plane.models import Cycle, CycleIssue, Issue, IssueAssignee, IssueLabel, Label
from tests.integration.factories import issue_for, make_project, make_state

pytestmark = pytest.mark.django_db


def events():
    return list(Outbox.objects.order_by("id"))


def only_event():
    rows = events()
    assert len(rows) == 1, [r.event_type for r in rows]
    return rows[0]


def clear_outbox():
    Outbox.objects.all().delete()


class TestIssueLifecycle:
    def test_create_writes_one_created_event_with_the_row(self, project):
        issue = issue_for(project, name="Login fails", estimate_point=3)
        issue.save()

        event = only_event()
        assert event.event_type == "issue.created"
        assert event.entity_type == "issue"
        assert event.entity_id == issue.id
        assert event.payload["previous_attributes"] == {}
        data = event.payload["data"]
        assert data["id"] == str(issue.id)
        assert data["name"] == "Login fails"
        assert data["project_id"] == str(project.id)
        assert event.processed_at is None and event.failed_at is None
        assert event.attempts == 0
        assert isinstance(event.event_id, uuid.UUID)

    def test_update_lists_only_changed_columns_with_old_values(self, project):
        state = make_state(project)
        issue = issue_for(project, name="Old", priority="low")
        issue.save()
        clear_outbox()

        issue.name = "New"
        issue.state = state
        issue.save()

        event = only_event()
        assert event.event_type == "issue.updated"
        assert event.payload["previous_attributes"] == {"name": "Old", "state_id": None}
        assert event.payload["data"]["name"] == "New"
        assert event.payload["data"]["state_id"] == str(state.id)
        assert event.payload["data"]["priority"] == "low"

    def test_update_of_ignored_columns_only_writes_nothing(self, project):
        issue = issue_for(project)
        issue.save()
        clear_outbox()

        issue.sort_order = 12.5
        issue.description_stripped = "derived text"
        issue.save()  # also bumps updated_at, ignored too

        assert events() == []

    def test_update_that_changes_nothing_writes_nothing(self, project):
        issue = issue_for(project)
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(name=issue.name)

        assert events() == []

    def test_soft_delete_writes_deleted(self, project):
        issue = issue_for(project)
        issue.save()
        clear_outbox()

        issue.deleted_at = timezone.now()
        issue.save()

        event = only_event()
        assert event.event_type == "issue.deleted"
        assert event.payload["previous_attributes"] == {"deleted_at": None}
        assert event.payload["data"]["deleted_at"] is not None

    def test_restoring_a_soft_deleted_issue_writes_created(self, project):
        deleted_at = timezone.now()
        issue = issue_for(project, deleted_at=deleted_at)
        issue.save()
        clear_outbox()

        issue.deleted_at = None
        issue.save()

        event = only_event()
        assert event.event_type == "issue.created"  # a consumer that dropped it takes it back
        assert event.payload["data"]["deleted_at"] is None
        previous = event.payload["previous_attributes"]
        assert datetime.datetime.fromisoformat(previous["deleted_at"]) == deleted_at

    def test_changing_a_soft_deleted_issue_writes_nothing(self, project):
        # Consumers dropped it on its .deleted; an .updated would bring it back to an upserting
        # indexer. Its restore will carry the whole row.
        issue = issue_for(project, deleted_at=timezone.now())
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(name="Renamed in the bin")

        assert events() == []

    def test_cycle_restore_writes_created(self, project):
        cycle = Cycle.objects.create(project=project, name="Sprint", deleted_at=timezone.now())
        clear_outbox()

        Cycle.objects.filter(pk=cycle.pk).update(deleted_at=None)

        assert only_event().event_type == "cycle.created"

    def test_hard_delete_writes_deleted_with_the_last_row(self, project):
        issue = issue_for(project, name="Gone")
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).delete()

        event = only_event()
        assert event.event_type == "issue.deleted"
        assert event.entity_id == issue.id
        assert event.payload["data"]["name"] == "Gone"
        assert event.payload["previous_attributes"] == {}

    def test_purging_a_soft_deleted_issue_announces_nothing_new(self, project):
        issue = issue_for(project, deleted_at=timezone.now())
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).delete()

        assert events() == []

    def test_changed_key_writes_the_old_keys_deleted_then_the_new_keys_created(self, project):
        issue = issue_for(project, name="Old name")
        issue.save()
        new_id = uuid.uuid4()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(id=new_id, name="New name")

        deleted, created = events()
        assert (deleted.event_type, deleted.entity_id) == ("issue.deleted", issue.id)
        assert deleted.payload == {
            "data": {**deleted.payload["data"], "id": str(issue.id), "name": "Old name"},
            "previous_attributes": {},
        }
        assert (created.event_type, created.entity_id) == ("issue.created", new_id)
        assert created.payload["data"]["id"] == str(new_id)
        assert created.payload["data"]["name"] == "New name"
        assert created.payload["previous_attributes"] == {}

    def test_one_statement_changing_one_key_among_three_rows(self, project):
        moved, kept_1, kept_2 = issues = [issue_for(project, name=f"i{n}") for n in range(3)]
        Issue.objects.bulk_create(issues)
        new_id = uuid.uuid4()
        clear_outbox()

        with connection.cursor() as cursor:
            cursor.execute(
                "UPDATE plane_issue SET priority = 'high', "
                "id = CASE WHEN id = %s THEN %s ELSE id END WHERE id = ANY(%s)",
                [moved.id, new_id, [i.id for i in issues]],
            )

        written = [(e.event_type, e.entity_id) for e in events()]
        assert written[:2] == [("issue.deleted", moved.id), ("issue.created", new_id)]
        assert sorted(written[2:]) == sorted(
            [("issue.updated", kept_1.id), ("issue.updated", kept_2.id)]
        )
        assert Outbox.objects.get(entity_id=kept_1.id).payload["previous_attributes"] == {
            "priority": "none"
        }

    def test_changed_key_of_a_soft_deleted_issue_announces_nothing(self, project):
        # Consumers saw its .deleted; under either key it stays gone until restored.
        issue = issue_for(project, deleted_at=timezone.now())
        issue.save()
        new_id = uuid.uuid4()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(id=new_id)

        assert events() == []

    def test_changed_key_and_restore_at_once_announce_the_new_key(self, project):
        issue = issue_for(project, deleted_at=timezone.now())
        issue.save()
        new_id = uuid.uuid4()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(id=new_id, deleted_at=None)

        event = only_event()
        assert (event.event_type, event.entity_id) == ("issue.created", new_id)

    def test_changed_key_and_soft_delete_at_once_announce_the_old_keys_deleted(self, project):
        issue = issue_for(project)
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(id=uuid.uuid4(), deleted_at=timezone.now())

        event = only_event()
        assert (event.event_type, event.entity_id) == ("issue.deleted", issue.id)

    def test_key_set_to_itself_writes_no_key_events(self, project):
        issue = issue_for(project)
        issue.save()
        clear_outbox()

        Issue.objects.filter(pk=issue.pk).update(id=issue.id, name="Renamed")

        event = only_event()
        assert event.event_type == "issue.updated"
        assert event.payload["previous_attributes"] == {"name": "An issue"}


class TestRelationEvents:
    def test_assignee_added_and_removed(self, project):
        issue = issue_for(project)
        issue.save()
        user = User.objects.create(username="ada")
        clear_outbox()

        link = IssueAssignee.objects.create(issue=issue, assignee=user)
        link_id = link.id
        link.delete()

        created, deleted = events()
        assert (created.event_type, deleted.event_type) == (
            "issue_assignee.created",
            "issue_assignee.deleted",
        )
        for event in (created, deleted):
            assert event.entity_id == link_id
            assert event.payload["data"]["issue_id"] == str(issue.id)
            assert event.payload["data"]["assignee_id"] == user.id  # an int stays an int

    def test_relation_row_with_a_changed_key(self, project):
        issue = issue_for(project)
        issue.save()
        link = IssueAssignee.objects.create(issue=issue, assignee=User.objects.create(username="b"))
        new_id = uuid.uuid4()
        clear_outbox()

        IssueAssignee.objects.filter(pk=link.pk).update(id=new_id)

        written = [(e.event_type, e.entity_id) for e in events()]
        assert written == [("issue_assignee.deleted", link.id), ("issue_assignee.created", new_id)]

    def test_label_added(self, project):
        issue = issue_for(project)
        issue.save()
        label = Label.objects.create(project=project, name="bug")
        clear_outbox()

        IssueLabel.objects.create(issue=issue, label=label)

        event = only_event()
        assert event.event_type == "issue_label.created"
        assert event.payload["data"]["label_id"] == str(label.id)

    def test_issue_added_to_and_moved_between_cycles(self, project):
        issue = issue_for(project)
        issue.save()
        sprint_1 = Cycle.objects.create(project=project, name="Sprint 1")
        sprint_2 = Cycle.objects.create(project=project, name="Sprint 2")
        clear_outbox()

        membership = CycleIssue.objects.create(cycle=sprint_1, issue=issue)
        membership.cycle = sprint_2
        membership.save()

        added, moved = events()
        assert added.event_type == "cycle_issue.created"
        assert moved.event_type == "cycle_issue.updated"
        assert moved.payload["previous_attributes"] == {"cycle_id": str(sprint_1.id)}
        assert moved.payload["data"]["cycle_id"] == str(sprint_2.id)

    def test_cycle_soft_delete(self, project):
        cycle = Cycle.objects.create(project=project, name="Sprint")
        clear_outbox()

        cycle.deleted_at = timezone.now()
        cycle.save()

        assert only_event().event_type == "cycle.deleted"


def truncate(sql: str) -> None:
    with connection.cursor() as cursor:
        # The test's own inserts left deferred foreign-key checks pending, and PostgreSQL
        # refuses to truncate a table with pending trigger events: run them now.
        cursor.execute("SET CONSTRAINTS ALL IMMEDIATE")
        cursor.execute(sql)


class TestTruncate:
    """A TRUNCATE removes rows without row or transition-table triggers; each row still leaves."""

    def test_truncate_writes_deleted_for_every_row_not_already_deleted(self, project):
        live = [issue_for(project, name=f"Live {n}") for n in range(2)]
        for issue in live:
            issue.save()
        issue_for(project, name="Soft-deleted", deleted_at=timezone.now()).save()
        link = IssueAssignee.objects.create(
            issue=live[0], assignee=User.objects.create(username="t")
        )
        clear_outbox()

        truncate("TRUNCATE plane_issue CASCADE")

        assert not Issue.objects.exists()
        written = {(e.event_type, e.entity_id): e.payload for e in events()}
        assert set(written) == {
            ("issue.deleted", live[0].id),
            ("issue.deleted", live[1].id),
            ("issue_assignee.deleted", link.id),  # truncated by the cascade
        }
        payload = written["issue.deleted", live[1].id]
        assert payload["data"]["name"] == "Live 1"
        assert payload["previous_attributes"] == {}

    def test_django_flush_empties_the_outbox_with_everything_else(self, project):
        """Django's flush (TransactionTestCase, `manage.py flush`) truncates every table in one
        statement: the events its triggers write go with the outbox."""
        from django.core.management.color import no_style

        issue_for(project).save()
        tables = connection.introspection.django_table_names(only_existing=True)

        for sql in connection.ops.sql_flush(no_style(), tables):
            truncate(sql)

        assert events() == [] and not Issue.objects.exists()


def truncate_under_repeatable_read(conn: psycopg.Connection, retries: int = 5) -> None:
    """TRUNCATE the issues in a REPEATABLE READ transaction, retried on serialization
    failures as such transactions are (another transaction may commit in between)."""
    for _ in range(retries):
        try:
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            conn.execute("TRUNCATE plane_issue CASCADE")
            conn.commit()
            return
        except psycopg.errors.SerializationFailure:
            conn.rollback()
    pytest.fail(f"TRUNCATE failed {retries} times as a serialization failure")


@pytest.mark.django_db(transaction=True)
def test_truncate_under_repeatable_read_sees_rows_committed_after_its_snapshot(conninfo, project):
    """Under REPEATABLE READ the trigger reads the table with the transaction's snapshot, but
    TRUNCATE removes every row: one committed after the snapshot would leave no `.deleted`
    (and one changed after it a stale one). Such a TRUNCATE fails, to be retried."""
    kept = issue_for(project, name="Before the snapshot")
    kept.save()
    with psycopg.connect(conninfo) as truncating:
        truncating.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        truncating.execute("SELECT count(*) FROM plane_issue")  # takes the snapshot
        added = issue_for(project, name="After the snapshot")
        added.save()  # committed by Django's connection (autocommit)
        kept.name = "Renamed after the snapshot"
        kept.save()

        with pytest.raises(psycopg.errors.SerializationFailure, match="TRUNCATE of plane_issue"):
            truncating.execute("TRUNCATE plane_issue CASCADE")
        truncating.rollback()
        assert Issue.objects.count() == 2
        assert not Outbox.objects.filter(event_type="issue.deleted").exists()

        truncate_under_repeatable_read(truncating)

    assert not Issue.objects.exists()
    deleted = Outbox.objects.filter(event_type="issue.deleted")
    assert {e.entity_id: e.payload["data"]["name"] for e in deleted} == {
        kept.id: "Renamed after the snapshot",
        added.id: "After the snapshot",
    }


class TestTransactions:
    def test_rolled_back_write_leaves_no_event(self, project):
        with pytest.raises(RuntimeError), transaction.atomic():
            issue_for(project).save()
            raise RuntimeError("abort")

        assert events() == []
        assert Issue.objects.count() == 0

    def test_error_inside_capture_fails_the_business_write(self, project):
        # Given an outbox that refuses issue events (a stand-in for any failure in capture)
        with connection.cursor() as cursor:
            cursor.execute(
                "ALTER TABLE outbox ADD CONSTRAINT refuse_issues "
                "CHECK (event_type <> 'issue.created')"
            )
        # When an issue is written, then the write fails too: nothing is swallowed
        with pytest.raises(IntegrityError, match="refuse_issues"), transaction.atomic():
            issue_for(project).save()

        assert Issue.objects.count() == 0
        assert events() == []

    def test_capture_ignores_the_callers_search_path(self, project):
        with connection.cursor() as cursor:
            cursor.execute("CREATE SCHEMA decoy")
            cursor.execute("CREATE TABLE decoy.outbox (LIKE outbox INCLUDING DEFAULTS)")
            cursor.execute("SET LOCAL search_path = decoy, public")
            issue_for(project).save()
            cursor.execute("SELECT count(*) FROM decoy.outbox")
            assert cursor.fetchone() == (0,)
            cursor.execute("SET LOCAL search_path = public")
        assert only_event().event_type == "issue.created"


# The columns a raw INSERT or COPY of an issue names (the others are nullable).
ISSUE_COLUMNS = (
    "id, created_at, updated_at, name, description_html, priority, sequence_id, sort_order, "
    "is_draft, project_id, workspace_id"
)


def shadow_the_outbox(conn: psycopg.Connection, shadow: str) -> None:
    """Give the session an `outbox` of its own that its default search_path finds first."""
    if shadow == "temporary table":
        conn.execute("CREATE TEMPORARY TABLE outbox (LIKE outbox INCLUDING ALL)")
        return
    (role,) = conn.execute("SELECT current_user").fetchone()
    schema = psycopg.sql.Identifier(role)  # the "$user" of the default search_path
    conn.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(schema))
    conn.execute(
        psycopg.sql.SQL("CREATE TABLE {}.outbox (LIKE outbox INCLUDING ALL)").format(schema)
    )


@pytest.mark.parametrize("shadow", ["temporary table", "schema named after the role"])
def test_an_outbox_of_the_session_does_not_catch_events(conninfo, shadow):
    """A table named `outbox` that the session's default search_path finds first (its temporary
    schema, or the `"$user"` schema) must not receive the events: they would be lost with it.

    A new session, so that no plan kept from an earlier write names the real outbox already;
    one transaction, rolled back (the issue's foreign keys are checked only at commit)."""
    qualified = (
        "SELECT format('%I.%I', n.nspname, c.relname) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = 'outbox'::regclass"
    )
    with psycopg.connect(conninfo) as conn:
        (real,) = conn.execute(qualified).fetchone()
        shadow_the_outbox(conn, shadow)
        (shadowing,) = conn.execute(qualified).fetchone()
        assert shadowing != real  # the session's unqualified `outbox` is now the other one

        conn.execute(
            f"INSERT INTO plane_issue ({ISSUE_COLUMNS})"
            " VALUES (%s, now(), now(), 'Shadowed', '', 'none', 1, 1, false, %s, %s)",
            (uuid.uuid4(), uuid.uuid4(), uuid.uuid4()),
        )

        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in (real, shadowing)
        }
        conn.rollback()
    assert counts == {real: 1, shadowing: 0}


class TestBulk:
    def test_bulk_insert_and_bulk_update_of_1000_rows(self, project):
        Issue.objects.bulk_create(issue_for(project, name=f"i{n}") for n in range(1000))
        assert Outbox.objects.filter(event_type="issue.created").count() == 1000

        Issue.objects.filter(project=project).update(priority="urgent")

        updated = Outbox.objects.filter(event_type="issue.updated")
        assert updated.count() == 1000
        assert {e.payload["previous_attributes"]["priority"] for e in updated} == {"none"}
        assert updated.values("entity_id").distinct().count() == 1000


class TestOtherWritingStatements:
    """Statements that write rows without being a plain INSERT, UPDATE or DELETE: each change
    still writes its one event (PostgreSQL fills the same transition tables for them)."""

    def test_upsert_writes_created_for_the_new_row_and_updated_for_the_conflicting_one(
        self, project
    ):
        existing = issue_for(project, name="Before")
        existing.save()
        clear_outbox()

        new = issue_for(project, name="Fresh")
        replacement = issue_for(project, name="After")
        replacement.id = existing.id
        Issue.objects.bulk_create(
            [replacement, new], update_conflicts=True, unique_fields=["id"], update_fields=["name"]
        )

        written = events()
        by_entity = {e.entity_id: e for e in written}
        assert len(written) == len(by_entity) == 2
        assert by_entity[existing.id].event_type == "issue.updated"
        assert by_entity[existing.id].payload["previous_attributes"] == {"name": "Before"}
        assert by_entity[new.id].event_type == "issue.created"

    def test_merge_writes_each_actions_event(self, project):
        kept, removed = issue_for(project, name="Kept"), issue_for(project, name="Removed")
        Issue.objects.bulk_create([kept, removed])
        clear_outbox()
        added = issue_for(project, name="Added")

        with connection.cursor() as cursor:
            cursor.execute(
                f"""
                MERGE INTO plane_issue AS t
                USING (VALUES (%s::uuid, 'keep'), (%s::uuid, 'remove'), (%s::uuid, 'add'))
                    AS s(id, action) ON t.id = s.id
                WHEN MATCHED AND s.action = 'remove' THEN DELETE
                WHEN MATCHED THEN UPDATE SET priority = 'urgent'
                WHEN NOT MATCHED THEN INSERT ({ISSUE_COLUMNS})
                    VALUES (s.id, now(), now(), 'Added', '', 'none', 1, 1, false, %s, %s)
                """,
                [kept.id, removed.id, added.id, project.id, project.workspace_id],
            )

        written = sorted((str(e.entity_id), e.event_type) for e in events())
        assert written == sorted(
            [
                (str(kept.id), "issue.updated"),
                (str(removed.id), "issue.deleted"),
                (str(added.id), "issue.created"),
            ]
        )

    def test_copy_writes_created_for_every_row(self, project):
        ids = [uuid.uuid4() for _ in range(3)]
        now, parents = timezone.now(), (project.id, project.workspace_id)
        rows = [
            (issue_id, now, now, f"Copied {n}", "", "none", n, 1.0, False, *parents)
            for n, issue_id in enumerate(ids)
        ]
        with (
            connection.cursor() as cursor,
            cursor.copy(f"COPY plane_issue ({ISSUE_COLUMNS}) FROM STDIN") as copy,
        ):
            for row in rows:
                copy.write_row(row)

        written = events()
        assert sorted(e.entity_id for e in written) == sorted(ids)
        assert {e.event_type for e in written} == {"issue.created"}


class TestJsonTypes:
    def test_types_survive(self, project):
        issue = issue_for(
            project,
            estimate_point=5,
            sort_order=1.5,
            is_draft=True,
            start_date=datetime.date(2026, 3, 1),
            completed_at=datetime.datetime(2026, 3, 2, 10, 30, tzinfo=datetime.UTC),
            description_stripped=None,
        )
        issue.save()

        data = only_event().payload["data"]
        assert data["estimate_point"] == 5 and type(data["estimate_point"]) is int
        assert data["sort_order"] == 1.5
        assert data["is_draft"] is True
        assert data["target_date"] is None
        assert data["description_stripped"] is None
        assert data["start_date"] == "2026-03-01"
        assert data["completed_at"].startswith("2026-03-02T10:30:00")
        assert data["id"] == str(issue.id)
        assert data["created_by_id"] is None

    @pytest.mark.parametrize("db_type", ["json", "json[]", "jsonpath", "point", "xml"])
    def test_a_column_without_equality_is_compared_as_jsonb(self, db_type):
        """Types without `=` (and arrays of them) cannot be compared in their own type; an
        UPDATE of such a table used to fail with "operator does not exist"."""
        values = {
            "json": ('{"a": 1}', '{"a": 2}', {"a": 1}),
            "json[]": (['{"a": 1}'], ['{"a": 2}'], [{"a": 1}]),
            "jsonpath": ("$.a", "$.b", '$."a"'),
            "point": ("(1,2)", "(3,4)", "(1,2)"),
            "xml": ("<a/>", "<b/>", "<a/>"),
        }
        before, after, previous = values[db_type]
        body = updated_func("probe", "id", [("name", "text"), ("value", db_type)], None)
        with connection.cursor() as cursor:
            cursor.execute(f"CREATE TABLE probe (id uuid PRIMARY KEY, name text, value {db_type})")
            cursor.execute(
                f"CREATE FUNCTION probe_update() RETURNS trigger LANGUAGE plpgsql"
                f" AS $$ BEGIN {body} END $$"
            )
            cursor.execute(
                "CREATE TRIGGER probe_update AFTER UPDATE ON probe"
                " REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows"
                " FOR EACH STATEMENT EXECUTE FUNCTION probe_update()"
            )
            cursor.execute("INSERT INTO probe VALUES (%s, 'old', %s)", (uuid.uuid4(), before))
            cursor.execute("UPDATE probe SET name = 'new'")  # the value compares equal
            cursor.execute("UPDATE probe SET value = %s", (after,))

        written = [e.payload["previous_attributes"] for e in events()]
        assert written == [{"name": "old"}, {"value": previous}]


class TestHandWrittenEvents:
    def test_seed_example_row_works(self):
        event = Outbox.objects.create(
            event_type="test.event",
            entity_type="test",
            entity_id="123e4567-e89b-12d3-a456-426614174000",
            payload={"message": "Hello, World!"},
        )

        event.refresh_from_db()
        assert event.state == "pending"
        assert event.created_at is not None and event.event_id is not None


def sleeping_relay(conninfo) -> psycopg.Connection:
    """A connection that listens and holds the wake-up lock, as a sleeping relay does."""
    conn = psycopg.connect(conninfo, autocommit=True)
    conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
    assert conn.execute("SELECT pg_try_advisory_lock(%s, %s)", WAKEUP_LOCK).fetchone()[0]
    return conn


@pytest.mark.django_db(transaction=True)
class TestNotify:
    def test_one_notify_per_inserting_statement_while_a_relay_sleeps(self, conninfo):
        project = make_project()
        with sleeping_relay(conninfo) as relay:
            Issue.objects.bulk_create(issue_for(project, name=f"i{n}") for n in range(50))
            issue_for(project).save()
            Issue.objects.filter(project=project).update(priority="high")

            received = list(relay.notifies(timeout=1.0))
        # project creation wrote no events; three statements wrote 50, 1 and 51 rows
        assert len(received) == 3
        assert {n.channel for n in received} == {NOTIFY_CHANNEL}

    def test_no_notify_while_no_relay_sleeps(self, conninfo):
        project = make_project()
        with psycopg.connect(conninfo, autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            issue_for(project).save()
            Issue.objects.filter(project=project).update(priority="high")

            received = list(listener.notifies(timeout=0.5))
        assert received == []
        assert Outbox.objects.count() == 2  # captured all the same: polling finds them

    def test_a_relay_cannot_promise_wakeups_while_a_silent_writer_is_uncommitted(self, conninfo):
        """The race a conditional NOTIFY must not lose: a writer inserts while no relay sleeps
        (so it will not notify), and commits after the relay's last claim. The relay must not
        go to sleep on a promise until that writer has committed."""
        import asyncio

        from event_stream.database import DatabaseConnection, WakeupPromise

        project = make_project()

        def save_an_issue():  # in a thread, as an app's request would, on its own connection
            try:
                issue_for(project).save()
            finally:
                connection.close()

        async def scenario():
            relay, other = DatabaseConnection(conninfo), DatabaseConnection(conninfo)
            await relay.connect()
            await other.connect_work()
            await relay.listen(NOTIFY_CHANNEL)
            try:
                with psycopg.connect(conninfo) as writer:  # one open transaction
                    writer.execute(
                        "UPDATE plane_issue SET priority = 'low' WHERE project_id = %s",
                        (project.id,),
                    )
                    assert await relay.promise_wakeups() is WakeupPromise.NONE
                    writer.commit()
                assert await relay.promise_wakeups() is WakeupPromise.MINE
                assert await other.promise_wakeups() is WakeupPromise.ANOTHER
                # From the promise on, every inserting commit wakes the relay.
                await asyncio.to_thread(save_an_issue)
                woken = await relay.wait_for_notifications(1.0, lambda: None)
                await relay.release_wakeups()
                await asyncio.to_thread(save_an_issue)
                after_release = await relay.wait_for_notifications(0.5, lambda: None)
                return woken, after_release, relay.holds_wakeup_lock
            finally:
                await relay.close()
                await other.close()

        issue_for(project).save()
        woken, after_release, still_held = asyncio.run(scenario())
        assert (woken, after_release, still_held) == (1, 0, False)


@pytest.mark.django_db(transaction=True)
def test_claimed_created_at_matches_make_event_data(conninfo):
    """The relay's text timestamp and Python's are the same string, to the microsecond."""
    import asyncio

    from event_stream.database import DatabaseConnection
    from event_stream.events import iso_utc

    project = make_project()
    issue_for(project).save()
    row = Outbox.objects.get()

    async def claim():
        db = DatabaseConnection(conninfo)
        await db.connect_work()
        try:
            return await db.fetch_and_lock_rows(10)
        finally:
            await db.close()

    (claimed,) = asyncio.run(claim())
    assert claimed[6] == iso_utc(row.created_at)
    assert claimed[1] == str(row.event_id) and claimed[4] == str(row.entity_id)


def test_update_trigger_plans_never_nest_loops_and_search_path_is_pinned():
    """PL/pgSQL keeps a trigger query's first plan per session; after a one-row UPDATE that
    plan must not be a nested loop over the transition tables, or a later bulk UPDATE in the
    same session compares every old row with every new one."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT p.proname, p.proconfig FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid"
            " WHERE t.tgrelid = 'plane_issue'::regclass AND NOT t.tgisinternal"
        )
        configs = dict(cursor.fetchall())
    update = [c for name, c in configs.items() if "update" in name]
    assert update and "enable_nestloop=off" in update[0]
    assert all(any(s.startswith("search_path=") for s in c) for c in configs.values())


def test_bulk_update_after_a_single_row_update_in_one_session(project):
    Issue.objects.bulk_create(issue_for(project, name=f"i{n}") for n in range(2000))
    first = Issue.objects.filter(project=project).first()
    clear_outbox()

    Issue.objects.filter(pk=first.pk).update(priority="low")
    Issue.objects.filter(project=project).update(priority="high")

    assert Outbox.objects.filter(event_type="issue.updated").count() == 2001


def test_migrations_match_the_models_and_their_triggers():
    from django.core.management import call_command

    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
