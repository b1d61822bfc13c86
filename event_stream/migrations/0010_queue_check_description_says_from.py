"""The queue-depth check's schedule describes the thresholds health uses since they follow the
seed's endpoint: a warning from 1,000 pending, an error from 5,000. A description an operator
changed is left as it is."""

from django.db import migrations

QUEUE_CHECK = "event_stream: queue depth check"
BEFORE = "Record the queue depth; warn above 1,000 pending, error above 5,000."
AFTER = "Record the queue depth; warn from 1,000 pending, error from 5,000."


def describe(old: str, new: str):
    def update(apps, schema_editor):
        PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
        PeriodicTask.objects.using(schema_editor.connection.alias).filter(
            name=QUEUE_CHECK, description=old
        ).update(description=new)

    return update


class Migration(migrations.Migration):
    dependencies = [("event_stream", "0009_notify_trigger_pins_search_path_tightly")]

    operations = [migrations.RunPython(describe(BEFORE, AFTER), describe(AFTER, BEFORE))]
