from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    # GET /event-stream/health/: the event stream's health (503 when critical).
    path("event-stream/", include("event_stream.urls")),
]
