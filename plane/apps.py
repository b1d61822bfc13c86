from django.apps import AppConfig


class PlaneConfig(AppConfig):
    name = "plane"
    verbose_name = "Plane (host project)"

    def ready(self) -> None:
        # Registers the example handlers in event_stream's application registry.
        from plane import handlers  # noqa: F401
