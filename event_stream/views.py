"""The health endpoint: GET /event-stream/health/ (see event_stream/urls.py).

JSON with the seed's fields (`status`, `unprocessed_events`, `last_processed_at`,
`queue_health`) plus `failed_events`, `oldest_pending_age_seconds`, `relays_alive` and
`counts_capped`. HTTP 200 when healthy or warning, 503 when critical. Never any payload.
"""

from __future__ import annotations

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from event_stream.health import collect


@never_cache
@require_GET
def health(request):
    report = collect()
    return JsonResponse(report.as_json(), status=503 if report.status == "critical" else 200)
