from django.apps import AppConfig


class EventStreamConfig(AppConfig):
    name = "event_stream"
    verbose_name = "Event stream"
    default_auto_field = "django.db.models.BigAutoField"
