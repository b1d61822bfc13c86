"""Capture: the triggers that write one outbox row per entity change, in the same transaction.

Declare them in a captured model's `Meta.triggers` with `capture_triggers(...)`; `makemigrations`
writes them into migrations (django-pgtrigger). Each trigger is statement-level with a
transition table, so a 1,000-row `UPDATE` costs one `INSERT ... SELECT` into the outbox, not
1,000 function calls. The difference between old and new row is computed with jsonb in one
expression, keeping JSON types (an int stays an int, null stays null).

What we do differently from Plane's own triggers: nothing here catches errors. If the outbox
insert fails, the business write fails with it; an event is never dropped silently.
"""

from __future__ import annotations

from collections.abc import Iterable

import pgtrigger
from pgtrigger import compiler

OUTBOX_TABLE = "outbox"
NOTIFY_CHANNEL = "event_stream_outbox"


class PinnedTriggerSqlV1(compiler.UpsertTriggerSql):
    """pgtrigger's installation SQL, with two changes for capture triggers.

    - The function's `search_path` is pinned to the one in force when the migration ran, so a
      session with another `search_path` cannot redirect the outbox insert.
    - No `pgtrigger.ignore` check: capture is never skipped by a session setting.

    Migrations reference this class by path; a changed template ships as a new `...V2` class.
    """

    def get_template(self) -> str:
        return """
            CREATE OR REPLACE FUNCTION {pgid}()
            RETURNS TRIGGER AS $$
                {declare}
                BEGIN
                    {func}
                END;
            $$ LANGUAGE plpgsql SET search_path FROM CURRENT;

            DROP TRIGGER IF EXISTS {pgid} ON {table};
            CREATE {constraint} TRIGGER {pgid}
                {when} {operation} ON {table}
                {timing}
                {referencing}
                FOR EACH {level} {condition}
                EXECUTE PROCEDURE {execute};

            COMMENT ON TRIGGER {pgid} ON {table} IS '{hash}';
        """


class PinnedTrigger(pgtrigger.Trigger):
    """A pgtrigger trigger installed with `PinnedTriggerSqlV1`."""

    def compile(self, model) -> compiler.Trigger:
        compiled = super().compile(model)
        sql = compiled.sql
        return compiler.Trigger(
            name=self.name,
            sql=PinnedTriggerSqlV1(
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


def _insert_events_sql(entity_type: str, pk_column: str, event_type_sql: str, rows_sql: str) -> str:
    return f"""
        INSERT INTO {OUTBOX_TABLE} (event_type, entity_type, entity_id, payload)
        SELECT {event_type_sql}, {_sql_text(entity_type)}, ev.entity_id, ev.payload
        FROM ({rows_sql}) AS ev;
        RETURN NULL;
    """


def created_func(entity_type: str, pk_column: str) -> str:
    rows = f"""
        SELECT r.{pk_column} AS entity_id,
               jsonb_build_object('data', to_jsonb(r), 'previous_attributes', '{{}}'::jsonb)
                   AS payload
        FROM new_rows AS r"""
    return _insert_events_sql(entity_type, pk_column, _sql_text(f"{entity_type}.created"), rows)


def deleted_func(entity_type: str, pk_column: str, soft_delete_column: str | None) -> str:
    # A row already soft-deleted announced its `.deleted` then; purging it later says nothing new.
    already_announced = f"WHERE r.{soft_delete_column} IS NULL" if soft_delete_column else ""
    rows = f"""
        SELECT r.{pk_column} AS entity_id,
               jsonb_build_object('data', to_jsonb(r), 'previous_attributes', '{{}}'::jsonb)
                   AS payload
        FROM old_rows AS r {already_announced}"""
    return _insert_events_sql(entity_type, pk_column, _sql_text(f"{entity_type}.deleted"), rows)


def updated_func(
    entity_type: str, pk_column: str, ignored_columns: Iterable[str], soft_delete_column: str | None
) -> str:
    # previous_attributes: the old value of every column whose value changed, leaving out the
    # ignored ones. An update that changes only ignored columns leaves it empty: no event.
    changed = f"""
        SELECT coalesce(jsonb_object_agg(o.key, o.value), '{{}}'::jsonb)
        FROM jsonb_each(old_doc.doc) AS o
        WHERE o.value IS DISTINCT FROM new_doc.doc -> o.key
          AND o.key <> ALL({_sql_text_array(ignored_columns)})"""
    if soft_delete_column:
        col = _sql_text(soft_delete_column)
        event_type = (
            f"CASE WHEN ev.soft_deleted THEN {_sql_text(entity_type + '.deleted')} "
            f"ELSE {_sql_text(entity_type + '.updated')} END"
        )
        soft_deleted = (
            f"(old_doc.doc -> {col}) = 'null'::jsonb AND (new_doc.doc -> {col}) <> 'null'::jsonb"
        )
    else:
        event_type = _sql_text(f"{entity_type}.updated")
        soft_deleted = "false"
    rows = f"""
        SELECT new_doc.entity_id,
               jsonb_build_object('data', new_doc.doc, 'previous_attributes', diff.changed)
                   AS payload,
               {soft_deleted} AS soft_deleted
        FROM (SELECT n.{pk_column} AS entity_id, to_jsonb(n) AS doc FROM new_rows AS n) AS new_doc
        JOIN (SELECT o.{pk_column} AS entity_id, to_jsonb(o) AS doc FROM old_rows AS o) AS old_doc
          USING (entity_id)
        CROSS JOIN LATERAL ({changed}) AS diff(changed)
        WHERE diff.changed <> '{{}}'::jsonb"""
    return _insert_events_sql(entity_type, pk_column, event_type, rows)


def capture_triggers(
    entity_type: str,
    *,
    ignore: Iterable[str] = (),
    soft_delete: str | None = None,
    pk_column: str = "id",
) -> list[pgtrigger.Trigger]:
    """The three capture triggers of one entity, for a model's `Meta.triggers`.

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
        PinnedTrigger(
            name=f"{name}_capture_update",
            level=pgtrigger.Statement,
            when=pgtrigger.After,
            operation=pgtrigger.Update,
            referencing=pgtrigger.Referencing(old="old_rows", new="new_rows"),
            func=updated_func(entity_type, pk_column, ignored, soft_delete),
        ),
        PinnedTrigger(
            name=f"{name}_capture_delete",
            level=pgtrigger.Statement,
            when=pgtrigger.After,
            operation=pgtrigger.Delete,
            referencing=pgtrigger.Referencing(old="old_rows"),
            func=deleted_func(entity_type, pk_column, soft_delete),
        ),
    ]


def outbox_notify_trigger() -> pgtrigger.Trigger:
    """One NOTIFY per statement that inserts into the outbox, however many rows it inserts.

    The relay treats it as a wake-up hint only; polling still finds every row.
    """
    return PinnedTrigger(
        name="outbox_notify",
        level=pgtrigger.Statement,
        when=pgtrigger.After,
        operation=pgtrigger.Insert,
        func=f"PERFORM pg_notify({_sql_text(NOTIFY_CHANNEL)}, ''); RETURN NULL;",
    )
