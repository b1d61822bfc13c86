"""Capture: the triggers that write one outbox row per entity change, in the same transaction.

Declare them in a captured model's `Meta.triggers` with `capture_triggers(...)`; `makemigrations`
writes them into migrations (django-pgtrigger). Each trigger is statement-level with a
transition table, so a 1,000-row `UPDATE` costs one `INSERT ... SELECT` into the outbox, not
1,000 function calls. Two cases they cannot see have triggers of their own: an UPDATE that
changes a primary key (the update trigger pairs old and new rows by key) is told by a row-level
trigger that fires only when the UPDATE names the key, as the old key's `.deleted` and the new
key's `.created`; a TRUNCATE (no transition tables) by a trigger that reads the table before it
is emptied, as each row's `.deleted`.

The payload is built as `json` text (`row_to_json`), which the outbox stores as written; the
difference between old and new row is one expression generated from the model's columns,
keeping JSON types (an int stays an int, null stays null).

What we do differently from Plane's own triggers: nothing here catches errors. If the outbox
insert fails, the business write fails with it; an event is never dropped silently.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import pgtrigger
from pgtrigger import compiler

OUTBOX_TABLE = "outbox"
NOTIFY_CHANNEL = "event_stream_outbox"
# The advisory lock (two-int4 key) a relay holds while it sleeps: see `outbox_notify_trigger`.
# The first half spells "outb", to stay clear of an application's own advisory locks.
WAKEUP_LOCK = (0x6F757462, 1)


class PinnedTriggerSqlV1(compiler.UpsertTriggerSql):
    """pgtrigger's installation SQL, with two changes for capture triggers.

    - The function's `search_path` is pinned to the one in force when the migration ran, so a
      session with another `search_path` cannot redirect the outbox insert (not tight enough:
      see `PinnedTriggerSqlV2`).
    - No `pgtrigger.ignore` check: capture is never skipped by a session setting.

    Migrations reference this class by path; a changed template ships as a new `...V2` class.
    """

    # Settings of the trigger function; part of the rendered SQL, so part of its hash.
    function_settings = "SET search_path FROM CURRENT"

    def get_template(self) -> str:
        return (
            """
            CREATE OR REPLACE FUNCTION {pgid}()
            RETURNS TRIGGER AS $$
                {declare}
                BEGIN
                    {func}
                END;
            $$ LANGUAGE plpgsql """
            + self.function_settings
            + """;

            DROP TRIGGER IF EXISTS {pgid} ON {table};
            CREATE {constraint} TRIGGER {pgid}
                {when} {operation} ON {table}
                {timing}
                {referencing}
                FOR EACH {level} {condition}
                EXECUTE PROCEDURE {execute};

            COMMENT ON TRIGGER {pgid} ON {table} IS '{hash}';
        """
        )


class PinnedJoinTriggerSqlV1(PinnedTriggerSqlV1):
    """`PinnedTriggerSqlV1` for a body that joins the transition tables: no nested loop.

    PL/pgSQL plans the body's query once per session and keeps the plan. A transition table has
    no statistics, only its row count at planning time; so when the first statement of a session
    updates one row, the kept plan is a nested loop, and a later 10,000-row UPDATE in that
    session compares 10,000 x 10,000 rows. With nested loops off for the function (restored on
    return), the kept plan is a hash join whatever the first statement was.
    """

    function_settings = "SET search_path FROM CURRENT SET enable_nestloop = off"


# Run right after the function is created, in the migration's transaction: the schemas its
# search_path resolves to (so "$user" is resolved now, not at each call), then the session's
# temporary schema, named last so that it is searched last.
_PIN_SEARCH_PATH = """
            DO $pin$ BEGIN
                EXECUTE format('ALTER FUNCTION %I() SET search_path = %s', '{pgid}', (
                    SELECT string_agg(quote_ident(s.name), ', ' ORDER BY s.position)
                    FROM unnest(current_schemas(false)) WITH ORDINALITY AS s(name, position)
                    WHERE s.name !~ '^pg_temp_[0-9]+$'
                ) || ', pg_temp');
            END $pin$;
"""


class PinnedTriggerSqlV2(PinnedTriggerSqlV1):
    """`PinnedTriggerSqlV1` with a pin that holds against the two tables V1 let in first.

    `SET search_path FROM CURRENT` kept `"$user"` symbolic and left the temporary schema
    implicit, which PostgreSQL searches first for tables. So a session's temporary table named
    `outbox`, or an `outbox` in a schema named after the calling role, received the events
    instead (the temporary one dropped them at the session's end). V2 pins the schemas the
    migration's `search_path` resolved to, then `pg_temp`.
    """

    function_settings = ""

    def get_template(self) -> str:
        return super().get_template() + _PIN_SEARCH_PATH


class PinnedJoinTriggerSqlV2(PinnedTriggerSqlV2):
    """`PinnedJoinTriggerSqlV1` with the pin of `PinnedTriggerSqlV2`."""

    function_settings = "SET enable_nestloop = off"


class PinnedTrigger(pgtrigger.Trigger):
    """A pgtrigger trigger installed with `PinnedTriggerSqlV2` (or the class's `sql_class`)."""

    sql_class: type[PinnedTriggerSqlV1] = PinnedTriggerSqlV2

    def compile(self, model) -> compiler.Trigger:
        compiled = super().compile(model)
        sql = compiled.sql
        return compiler.Trigger(
            name=self.name,
            sql=self.sql_class(
                pgid=sql.pgid,
                declare=self.render_declare(model),
                func=self.render_func(model),
                table=model._meta.db_table,
                when=self.when,
                operation=self.operation,
                referencing=self.referencing or "",
                level=self.level,
                condition=self.render_condition(model),
                execute=self.render_execute(model),
            ),
        )


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_text_array(values: Iterable[str]) -> str:
    items = ", ".join(_sql_text(v) for v in values)
    return f"ARRAY[{items}]::text[]"


_OUTBOX_INSERT = f"INSERT INTO {OUTBOX_TABLE} (event_type, entity_type, entity_id, payload)"


def _whole_row_payload(row: str) -> str:
    """The payload of a created or deleted row: all of it, nothing changed."""
    return f"json_build_object('data', row_to_json({row}), 'previous_attributes', '{{}}'::json)"


def _insert_events_sql(entity_type: str, event_type_sql: str, rows_sql: str) -> str:
    return f"""
        {_OUTBOX_INSERT}
        SELECT {event_type_sql}, {_sql_text(entity_type)}, ev.entity_id, ev.payload
        FROM ({rows_sql}) AS ev;
        RETURN NULL;
    """


def _whole_rows_sql(pk_sql: str, source: str, where: str | None = None) -> str:
    """Each row of `source` (as `r`) with its key and whole-row payload, as `_insert_events_sql`
    takes them. `pk_sql` is the key column as the caller renders it, and `where` (even empty)
    follows a space: the installed triggers' SQL, and so their hashes, stay as they were."""
    tail = "" if where is None else f" {where}"
    return f"""
        SELECT r.{pk_sql} AS entity_id,
               {_whole_row_payload("r")}
                   AS payload
        FROM {source} AS r{tail}"""


def _not_soft_deleted(soft_delete_sql: str | None, row: str = "r") -> str:
    """Only a row that is not soft-deleted is seen by consumers. One that is announced its
    `.deleted` then: removing it says nothing new, and neither does giving it a new key."""
    return f"WHERE {row}.{soft_delete_sql} IS NULL" if soft_delete_sql else ""


def created_func(entity_type: str, pk_column: str) -> str:
    rows = _whole_rows_sql(pk_column, "new_rows")
    return _insert_events_sql(entity_type, _sql_text(f"{entity_type}.created"), rows)


def deleted_func(entity_type: str, pk_column: str, soft_delete_column: str | None) -> str:
    rows = _whole_rows_sql(pk_column, "old_rows", _not_soft_deleted(soft_delete_column))
    return _insert_events_sql(entity_type, _sql_text(f"{entity_type}.deleted"), rows)


def truncated_func(
    entity_type: str, pk_column: str, table: str, soft_delete_column: str | None
) -> str:
    """The BEFORE TRUNCATE body: every row's `.deleted`, as a DELETE of all rows would write.

    A TRUNCATE removes rows without a transition table or row triggers, so without this its
    rows would vanish from the stream; before it, the table still holds them (and is locked
    exclusively, so none can change in between). `ONLY`: a child table that is truncated with
    its parent fires a trigger of its own.
    """
    soft_delete = _ident(soft_delete_column) if soft_delete_column else None
    rows = _whole_rows_sql(
        _ident(pk_column), f"ONLY {_ident(table)}", _not_soft_deleted(soft_delete)
    )
    events = _insert_events_sql(entity_type, _sql_text(f"{entity_type}.deleted"), rows)
    return _refuse_a_stale_snapshot(table) + events


def _refuse_a_stale_snapshot(table: str) -> str:
    """Fail a TRUNCATE whose rows the transaction's snapshot may not all show.

    Under READ COMMITTED the trigger's query takes a new snapshot, after TRUNCATE locked the
    table: it sees every row there is. Under REPEATABLE READ and SERIALIZABLE it reads with the
    transaction's snapshot, while TRUNCATE removes every row, also those committed after that
    snapshot: their `.deleted` would be missing or stale. Such a row's writer has committed by
    now (it held a lock that TRUNCATE waited for), so it is among the transactions that
    committed after the snapshot: if there is any, the TRUNCATE fails as a serialization failure
    (SQLSTATE 40001), which such a transaction is expected to retry. Any other transaction's
    commit fails it too: the snapshot cannot tell which tables a commit touched. Transaction ids
    from ours on are not looked at: ours is assigned here at the latest, after TRUNCATE locked
    the table, so a transaction given a later one cannot have written it.
    """
    message = (
        f"could not capture TRUNCATE of {table}: transactions committed after this "
        "transaction's snapshot, and the rows they wrote would be removed unseen"
    )
    return f"""
        IF current_setting('transaction_isolation') <> 'read committed' AND EXISTS (
            SELECT FROM pg_current_snapshot() AS s(snapshot),
                 generate_series(pg_snapshot_xmin(s.snapshot)::text::bigint,
                                 pg_current_xact_id()::text::bigint - 1) AS x(id)
            WHERE NOT pg_visible_in_snapshot(x.id::text::xid8, s.snapshot)
              AND pg_xact_status(x.id::text::xid8) = 'committed'
        ) THEN
            RAISE EXCEPTION USING ERRCODE = 'serialization_failure', MESSAGE = {_sql_text(message)},
                HINT = 'Retry the transaction, or TRUNCATE under READ COMMITTED.';
        END IF;"""


def key_changed_func(entity_type: str, pk_column: str, soft_delete_column: str | None) -> str:
    """The row-level body for an UPDATE that changed a row's primary key.

    The update trigger pairs old and new rows by key, so a row whose key changed has no pair
    there. It is told as its delete and insert triggers would tell it: the old key's
    `.deleted` and the new key's `.created`, each with its whole row, each only where the row
    is not soft-deleted (a soft-deleted row is gone for consumers; a restore is `.created`).
    """
    pk = _ident(pk_column)
    soft_delete = _ident(soft_delete_column) if soft_delete_column else None
    return f"""
        {_OUTBOX_INSERT}
        SELECT {_sql_text(f"{entity_type}.deleted")}, {_sql_text(entity_type)}, OLD.{pk},
               {_whole_row_payload("OLD")}
        {_not_soft_deleted(soft_delete, "OLD")};
        {_OUTBOX_INSERT}
        SELECT {_sql_text(f"{entity_type}.created")}, {_sql_text(entity_type)}, NEW.{pk},
               {_whole_row_payload("NEW")}
        {_not_soft_deleted(soft_delete, "NEW")};
        RETURN NULL;
    """


# Column types without an equality operator (arrays of them too): compared as jsonb instead.
# A domain or composite type over one of them is not recognised by its name: such a column
# makes the update trigger fail (never silently), and belongs in the entity's `ignore`.
NO_EQUALITY_TYPES = frozenset(
    {
        "json",
        "jsonpath",
        "xml",
        "point",
        "line",
        "lseg",
        "box",
        "path",
        "polygon",
        "circle",
        "txid_snapshot",
        "pg_snapshot",
    }
)


def _has_no_equality(db_type: str | None) -> bool:
    """Whether a column of this database type (as Django renders it) can't be compared by `=`:
    `json`, `json[]`, `json[][]` alike; a length or precision in brackets is left out."""
    base = (db_type or "").split("(")[0].replace("[]", "").strip().lower()
    return base in NO_EQUALITY_TYPES


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def updated_func(
    entity_type: str,
    pk_column: str,
    compared_columns: Iterable[tuple[str, str | None]],
    soft_delete_column: str | None,
) -> str:
    """The update trigger's body, for the given (column, database type) pairs to compare.

    previous_attributes holds the old value of every compared column whose value changed; an
    update that changes none of them writes nothing. The columns are compared in their own
    types, and only a changed old value is turned into JSON (`to_json`, as `row_to_json` of the
    row converts it, so JSON types are kept). The object is one `concat_ws` of the changed
    members, which skips the unchanged (NULL) ones: no per-column object is built and merged,
    and the comparisons are written once (the outer WHERE filters on the result), which keeps
    the expression a single-row UPDATE has to set up small. The generic alternative,
    `jsonb_each(to_jsonb(old))` matched key by key against `to_jsonb(new)`, costs several times
    more per row (an SRF and a jsonb value per column), which a 500-row UPDATE pays in full.
    """
    compared = list(compared_columns)
    if not compared:
        raise ValueError(f"{entity_type}: no column left to compare on update")

    def old_new(column: str, db_type: str | None) -> tuple[str, str]:
        old, new = f"o.{_ident(column)}", f"n.{_ident(column)}"
        if _has_no_equality(db_type):
            return f"to_jsonb({old})", f"to_jsonb({new})"
        return old, new

    members = [
        f"CASE WHEN {new} IS DISTINCT FROM {old} "
        f"THEN {_sql_text(json.dumps(column) + ':')} "
        f"|| coalesce(to_json(o.{_ident(column)})::text, 'null') END"
        for column, db_type in compared
        for old, new in [old_new(column, db_type)]
    ]
    in_the_bin = ""
    if soft_delete_column:
        col = _ident(soft_delete_column)
        # A row soft-deleted before and after the update stays gone for consumers: changing it
        # there announces nothing (an indexer taking `.updated` as an upsert would bring it
        # back); its restore will carry the whole row.
        in_the_bin = f"\n            WHERE o.{col} IS NULL OR n.{col} IS NULL"
        # A soft delete is the entity's `.deleted`; clearing the column again (a restore) is
        # its `.created`, as if inserted anew: a consumer that dropped the entity on `.deleted`
        # takes it back. `previous_attributes` tells a restore from an insert.
        event_type = (
            f"CASE WHEN o.{col} IS NULL AND n.{col} IS NOT NULL "
            f"THEN {_sql_text(entity_type + '.deleted')} "
            f"WHEN o.{col} IS NOT NULL AND n.{col} IS NULL "
            f"THEN {_sql_text(entity_type + '.created')} "
            f"ELSE {_sql_text(entity_type + '.updated')} END"
        )
    else:
        event_type = _sql_text(f"{entity_type}.updated")
    pk = _ident(pk_column)
    return f"""
        {_OUTBOX_INSERT}
        SELECT ev.event_type, {_sql_text(entity_type)}, ev.entity_id,
               json_build_object(
                   'data', row_to_json(ev.new_row),
                   'previous_attributes', ('{{' || ev.changed || '}}')::json)
        FROM (
            SELECT {event_type} AS event_type, n.{pk} AS entity_id, n AS new_row,
                   {_joined_members(members)} AS changed
            FROM new_rows AS n
            JOIN old_rows AS o ON o.{pk} = n.{pk}{in_the_bin}
            OFFSET 0  -- computed once per row, not again for the WHERE below
        ) AS ev
        WHERE ev.changed <> '';
        RETURN NULL;
    """


# A function takes at most 100 arguments: wider tables join their members in groups.
_MEMBERS_PER_CALL = 90


def _joined_members(members: list[str]) -> str:
    """One text of the non-NULL members, comma-separated ('' when none)."""
    if len(members) <= _MEMBERS_PER_CALL:
        return "concat_ws(',',\n                " + ",\n                ".join(members) + ")"
    groups = [
        f"NULLIF({_joined_members(members[i : i + _MEMBERS_PER_CALL])}, '')"
        for i in range(0, len(members), _MEMBERS_PER_CALL)
    ]
    return _joined_members(groups)


class UpdateCaptureTrigger(PinnedTrigger):
    """The update trigger, whose body names the model's columns: rendered per model.

    `makemigrations` renders it again when a column is added or removed, and writes the
    changed trigger into a migration like any other change of the model.
    """

    sql_class = PinnedJoinTriggerSqlV2

    def __init__(
        self,
        *,
        entity_type: str,
        pk_column: str,
        ignore: Iterable[str],
        soft_delete: str | None,
        **kwargs,
    ) -> None:
        self.entity_type = entity_type
        self.pk_column = pk_column
        self.ignore = tuple(ignore)
        self.soft_delete = soft_delete
        super().__init__(**kwargs)

    def get_func(self, model) -> str:
        from django.db import connection

        fields = model._meta.concrete_fields
        columns = {f.column for f in fields}
        named = {*self.ignore, self.pk_column, *([self.soft_delete] if self.soft_delete else [])}
        unknown = sorted(named - columns)
        if unknown:
            raise ValueError(
                f"{model._meta.label}: capture names unknown columns {unknown}; "
                f"its columns are {sorted(columns)}"
            )
        # The key is equal on both sides of the pairing; a changed key is the key trigger's.
        compared = [
            (f.column, f.db_type(connection))
            for f in fields
            if f.column not in self.ignore and f.column != self.pk_column
        ]
        return updated_func(self.entity_type, self.pk_column, compared, self.soft_delete)


class TruncateCaptureTrigger(PinnedTrigger):
    """The TRUNCATE trigger, whose body reads the model's own table: rendered per model."""

    def __init__(
        self, *, entity_type: str, pk_column: str, soft_delete: str | None, **kwargs
    ) -> None:
        self.entity_type = entity_type
        self.pk_column = pk_column
        self.soft_delete = soft_delete
        super().__init__(**kwargs)

    def get_func(self, model) -> str:
        return truncated_func(
            self.entity_type, self.pk_column, model._meta.db_table, self.soft_delete
        )


def capture_triggers(
    entity_type: str,
    *,
    ignore: Iterable[str] = (),
    soft_delete: str | None = None,
    pk_column: str = "id",
) -> list[pgtrigger.Trigger]:
    """The capture triggers of one entity, for a model's `Meta.triggers`.

    entity_type: prefix of the event types (`issue` gives `issue.created`, ...).
    ignore: columns whose change alone emits nothing (`updated_at`, large text columns).
    soft_delete: a nullable timestamp column; setting it emits `<entity>.deleted`.
    """
    ignored = list(ignore)
    name = entity_type.replace(".", "_")
    return [
        PinnedTrigger(
            name=f"{name}_capture_insert",
            level=pgtrigger.Statement,
            when=pgtrigger.After,
            operation=pgtrigger.Insert,
            referencing=pgtrigger.Referencing(new="new_rows"),
            func=created_func(entity_type, pk_column),
        ),
        UpdateCaptureTrigger(
            name=f"{name}_capture_update",
            level=pgtrigger.Statement,
            when=pgtrigger.After,
            operation=pgtrigger.Update,
            referencing=pgtrigger.Referencing(old="old_rows", new="new_rows"),
            entity_type=entity_type,
            pk_column=pk_column,
            ignore=ignored,
            soft_delete=soft_delete,
        ),
        PinnedTrigger(
            name=f"{name}_capture_key_change",
            level=pgtrigger.Row,
            when=pgtrigger.After,
            # Fires only for an UPDATE that names the key in its SET list (a Django save never
            # does), so every other UPDATE pays no expression for it, only a column check.
            operation=pgtrigger.UpdateOf(pk_column),
            condition=pgtrigger.Condition(
                f"OLD.{_ident(pk_column)} IS DISTINCT FROM NEW.{_ident(pk_column)}"
            ),
            func=key_changed_func(entity_type, pk_column, soft_delete),
        ),
        PinnedTrigger(
            name=f"{name}_capture_delete",
            level=pgtrigger.Statement,
            when=pgtrigger.After,
            operation=pgtrigger.Delete,
            referencing=pgtrigger.Referencing(old="old_rows"),
            func=deleted_func(entity_type, pk_column, soft_delete),
        ),
        TruncateCaptureTrigger(
            name=f"{name}_capture_truncate",
            level=pgtrigger.Statement,
            when=pgtrigger.Before,
            operation=pgtrigger.Truncate,
            entity_type=entity_type,
            pk_column=pk_column,
            soft_delete=soft_delete,
        ),
    ]


def outbox_notify_trigger() -> pgtrigger.Trigger:
    """One NOTIFY per statement that inserts into the outbox, when a relay sleeps.

    A NOTIFY is not free: at commit, PostgreSQL serializes every notifying transaction of the
    cluster on one lock, held through the commit's disk flush. With 8 writers doing single-row
    updates (`bench/capture.py`), capture kept 70-74% of their rate without it, 40-41% with it.
    So a relay about to sleep takes `WAKEUP_LOCK` exclusively (session-level), and a writer
    notifies only when it cannot take it shared: a busy relay costs the writers nothing.

    Nothing is lost in between: the writer's shared lock lasts until its commit, so a relay
    cannot take the lock while a writer that sent no NOTIFY has events in flight; once it has
    the lock, those writers have committed (locks are released after the commit is visible),
    and the relay claims once more before sleeping. The relay treats a NOTIFY as a wake-up hint
    only; polling still finds every row.
    """
    classid, objid = WAKEUP_LOCK
    return PinnedTrigger(
        name="outbox_notify",
        level=pgtrigger.Statement,
        when=pgtrigger.After,
        operation=pgtrigger.Insert,
        func=(
            f"IF NOT pg_try_advisory_xact_lock_shared({classid}, {objid}) THEN "
            f"PERFORM pg_notify({_sql_text(NOTIFY_CHANNEL)}, ''); END IF; RETURN NULL;"
        ),
    )
