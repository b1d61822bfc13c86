from django.db import migrations

# VACUUM hands the empty pages at the end of a table back to the file system by default. On
# the outbox, a queue that fills and drains, that is wrong twice: the truncation takes an ACCESS
# EXCLUSIVE lock, which stalls every write that captures an event while it lasts; and the next
# events must extend the file again, one page (about ten events) at a time on PostgreSQL 15,
# which was 16% of a 500-row UPDATE's backend time with capture (bench/capture.py, perf).
# Kept, the cleaned-up pages take the next events.


class Migration(migrations.Migration):
    dependencies = [
        ("event_stream", "0007_claim_without_entity_index"),
    ]

    operations = [
        migrations.RunSQL(
            "ALTER TABLE outbox SET (vacuum_truncate = false)",
            reverse_sql="ALTER TABLE outbox RESET (vacuum_truncate)",
        ),
    ]
