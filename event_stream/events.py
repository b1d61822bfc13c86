"""The `event_data` dict every handler receives, inline or in a Celery worker alike.

The seed's fields, in JSON types only, so a Celery message carries exactly what an inline
handler sees: ids and timestamps as strings, the payload as the trigger wrote it.
"""

from __future__ import annotations

import datetime
import uuid
from typing import Any

EventData = dict[str, Any]


def make_event_data(
    *,
    id: int,
    event_id: uuid.UUID | str,
    event_type: str,
    entity_type: str,
    entity_id: uuid.UUID | str | None,
    payload: Any,
    created_at: datetime.datetime | str,
    attempts: int = 0,
) -> EventData:
    return {
        "id": id,
        "event_id": str(event_id),
        "event_type": event_type,
        "entity_type": entity_type,
        "entity_id": None if entity_id is None else str(entity_id),
        "payload": payload,
        # Not processed yet while handlers run: the row is marked after they all succeeded.
        "processed_at": None,
        "created_at": created_at if isinstance(created_at, str) else created_at.isoformat(),
        # 0 on the first delivery; handlers may use it to tell a retry.
        "attempts": attempts,
    }
