"""Include in the host's URLconf: `path("event-stream/", include("event_stream.urls"))`."""

from django.urls import path

from event_stream import views

app_name = "event_stream"

urlpatterns = [
    path("health/", views.health, name="health"),
]
