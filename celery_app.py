"""The Celery app, configured from Django's settings (`CELERY_*`); broker from CELERY_BROKER_URL.

celery -A celery_app worker
celery -A celery_app beat
"""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "plane.settings")

app = Celery("event_stream")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["event_stream"])
