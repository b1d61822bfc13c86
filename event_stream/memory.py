"""Resident-memory checks: over the limit, the relay finishes its batch and restarts in place."""

from __future__ import annotations

import time

import psutil


class MemoryMonitor:
    def __init__(self, memory_limit_mb: int, check_interval: float, *, clock=time.monotonic):
        self.memory_limit_mb = memory_limit_mb
        self.check_interval = check_interval
        self._clock = clock
        self._process = psutil.Process()
        self._next_check = clock() + check_interval
        self.last_mb = self.current_mb()
        self.peak_mb = self.last_mb

    def current_mb(self) -> float:
        return self._process.memory_info().rss / (1024 * 1024)

    def over_limit(self) -> bool:
        """Checks at most once per interval; True when resident memory exceeds the limit."""
        now = self._clock()
        if now < self._next_check:
            return False
        self._next_check = now + self.check_interval
        self.last_mb = self.current_mb()
        self.peak_mb = max(self.peak_mb, self.last_mb)
        return self.last_mb > self.memory_limit_mb
