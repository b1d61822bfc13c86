"""An in-memory stand-in for DatabaseConnection, for unit tests of the loop's logic.

It keeps the same contract: claimed rows stay claimed until commit or rollback; a rollback (or a
lost connection) releases them; a retry holds its row back until its delay has passed. The real
SQL is proven on PostgreSQL in tests/integration.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import time
import uuid

from event_stream.database import WakeupPromise


class FakeDatabase:
    def __init__(self, ordered: bool = True):
        self.ordered = ordered
        self.rows: dict[int, dict] = {}
        self.claimed: set[int] = set()
        self._pending_changes: list = []
        self.work_ok = False
        self.control_ok = False
        self.fail_next_claims = 0
        self.notifications: asyncio.Queue = asyncio.Queue()
        self.heartbeats: list[dict] = []
        self.listening: list[str] = []
        self.connects = 0
        self._next_id = 1
        # What promise_wakeups answers next (the real one asks PostgreSQL's lock table).
        self.wakeup_answers: list[WakeupPromise] = []
        self.holds_wakeup_lock = False
        self.log: list[str] = []  # claims and wake-up calls, in order

    def add(self, event_type="test.changed", entity_id=None, payload=None) -> int:
        row_id = self._next_id
        self._next_id += 1
        self.rows[row_id] = {
            "id": row_id,
            "event_id": uuid.uuid4(),
            "event_type": event_type,
            "entity_type": "test",
            "entity_id": entity_id,
            "payload": {"n": row_id} if payload is None else payload,
            "created_at": datetime.datetime.now(datetime.UTC),
            "attempts": 0,
            "available_at": 0.0,  # monotonic; a retry puts it off by its delay
            "state": "pending",
            "error": None,
        }
        return row_id

    def state(self, row_id: int) -> str:
        return self.rows[row_id]["state"]

    async def connect_work(self):
        self.connects += 1
        self.work_ok = True

    async def connect_control(self):
        self.control_ok = True

    async def promise_wakeups(self):
        answer = self.wakeup_answers.pop(0) if self.wakeup_answers else WakeupPromise.MINE
        self.holds_wakeup_lock = answer is WakeupPromise.MINE
        self.log.append(f"promise:{answer.value}")
        return answer

    async def wake_relays(self):
        self.log.append("wake relays")

    async def release_wakeups(self):
        self.holds_wakeup_lock = False
        self.log.append("release")

    async def fetch_and_lock_rows(self, batch_size):
        if self.fail_next_claims:
            self.fail_next_claims -= 1
            self.work_ok = False
            raise ConnectionError("server closed the connection unexpectedly")
        pending = [r for r in sorted(self.rows.values(), key=lambda r: r["id"])
                   if r["state"] == "pending"]  # fmt: skip
        taken = []
        seen_entities = set()
        now = time.monotonic()
        for row in pending:
            blocked = row["entity_id"] in seen_entities and row["id"] not in self.claimed
            if row["id"] in self.claimed or row["available_at"] > now or (self.ordered and blocked):
                seen_entities.add(row["entity_id"])
                continue
            if row["entity_id"] is not None:
                seen_entities.add(row["entity_id"])
            taken.append(row)
            if len(taken) == batch_size:
                break
        self.claimed.update(r["id"] for r in taken)
        self.log.append(f"claim:{len(taken)}")
        # As the real claim returns them: ids, payload and timestamp as text.
        return [
            (r["id"], str(r["event_id"]), r["event_type"], r["entity_type"],
             None if r["entity_id"] is None else str(r["entity_id"]),
             json.dumps(r["payload"]), r["created_at"].isoformat(), r["attempts"])
            for r in taken
        ]  # fmt: skip

    async def mark_processed(self, ids):
        self._pending_changes += [(i, "processed", None, 0) for i in ids]
        return True

    async def schedule_retries(self, retries):
        self._pending_changes += [(i, "retry", error, delay) for i, delay, error in retries]

    async def mark_failed(self, failures):
        self._pending_changes += [(i, "failed", error, 0) for i, error in failures]

    async def finish_batch(self, processed, retries, failures):
        await self.mark_processed(processed)
        await self.schedule_retries(retries)
        await self.mark_failed(failures)
        await self.commit()

    async def commit(self):
        for row_id, state, error, delay in self._pending_changes:
            row = self.rows[row_id]
            if state == "retry":
                row["attempts"] += 1
                row["available_at"] = time.monotonic() + delay
            else:
                row["state"] = state
                row["attempts"] += state == "failed"
            row["error"] = error
        self._pending_changes = []
        self.claimed.clear()

    async def rollback(self):
        self._pending_changes = []
        self.claimed.clear()

    async def listen(self, channel):
        self.listening.append(channel)

    async def wait_for_notifications(self, timeout, on_arrival):
        try:
            await asyncio.wait_for(self.notifications.get(), timeout)
        except TimeoutError:
            return 0
        on_arrival()
        return 1

    async def record_heartbeat(self, beat):
        self.heartbeats.append(dict(beat))

    async def remove_heartbeat(self, relay_id):
        self.heartbeats.append({"removed": relay_id})

    async def close_work(self):
        await self.rollback()
        self.work_ok = False
        self.holds_wakeup_lock = False

    async def close_control(self):
        self.control_ok = False

    async def close(self):
        await self.close_work()
        await self.close_control()
