from django.apps import AppConfig


class EventStreamConfig(AppConfig):
    name = "event_stream"
    verbose_name = "Event stream"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from event_stream import checks  # noqa: F401  (registers the system checks)
