"""Beat's schedule for the event stream, in django-celery-beat's tables (DatabaseScheduler).

- event_stream.cleanup_processed, daily at 03:30 UTC: deletes processed events older than
  OUTBOX_RETENTION_DAYS (default 7).
- event_stream.check_queue_depth, every minute: records and logs the queue depth.

Created on `migrate`; rows that already exist (by name) are left as an operator edited them.
"""

from django.db import migrations

CLEANUP = "event_stream: delete processed events past retention"
QUEUE_CHECK = "event_stream: queue depth check"


def create_schedule(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTasks = apps.get_model("django_celery_beat", "PeriodicTasks")
    db = schema_editor.connection.alias

    daily = CrontabSchedule.objects.using(db).filter(
        minute="30", hour="3", day_of_week="*", day_of_month="*", month_of_year="*",
        timezone="UTC",
    ).first() or CrontabSchedule.objects.using(db).create(
        minute="30", hour="3", day_of_week="*", day_of_month="*", month_of_year="*",
        timezone="UTC",
    )
    every_minute, _ = IntervalSchedule.objects.using(db).get_or_create(every=1, period="minutes")

    PeriodicTask.objects.using(db).get_or_create(
        name=CLEANUP,
        defaults={
            "task": "event_stream.cleanup_processed",
            "crontab": daily,
            "description": "Delete processed outbox rows older than OUTBOX_RETENTION_DAYS, "
            "in chunks; pending and failed rows are never touched.",
        },
    )
    PeriodicTask.objects.using(db).get_or_create(
        name=QUEUE_CHECK,
        defaults={
            "task": "event_stream.check_queue_depth",
            "interval": every_minute,
            # A missed check is worthless a minute later.
            "expire_seconds": 60,
            "description": "Record the queue depth; warn above 1,000 pending, error above 5,000.",
        },
    )
    # Tell a running beat that the schedule changed.
    from django.utils import timezone

    PeriodicTasks.objects.using(db).update_or_create(
        ident=1, defaults={"last_update": timezone.now()}
    )


def remove_schedule(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.using(schema_editor.connection.alias).filter(
        name__in=[CLEANUP, QUEUE_CHECK]
    ).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("event_stream", "0002_queuecheck"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create_schedule, remove_schedule)]
