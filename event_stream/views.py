"""The health endpoint: GET (or HEAD) /event-stream/health/ (see event_stream/urls.py).

JSON with the seed's fields (`status`, `unprocessed_events`, `last_processed_at`,
`queue_health`) plus `failed_events`, `oldest_pending_age_seconds`, `relays_alive` and
`counts_capped`. HTTP 200 when healthy or warning, 503 when critical. Never any payload.
When the database cannot be asked, 503 with `status` critical and `error`: a load balancer or
monitor polling this view must see an outage as one, not as a server error.
"""

from __future__ import annotations

import logging

from django.db import DatabaseError
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from event_stream.health import collect

logger = logging.getLogger("event_stream.health")


@never_cache
@require_safe
def health(request):
    try:
        report = collect()
    except DatabaseError as exc:
        # The error's text may name hosts and users: it goes to the log, not to the caller.
        logger.error("health: the database did not answer: %s", exc)
        body = {"status": "critical", "queue_health": "unknown", "error": "database unavailable"}
        return JsonResponse(body, status=503)
    return JsonResponse(report.as_json(), status=503 if report.status == "critical" else 200)
