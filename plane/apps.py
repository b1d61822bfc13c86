from django.apps import AppConfig


class PlaneConfig(AppConfig):
    name = "plane"
    verbose_name = "Plane (host project)"
