"""The handler registry: which functions handle which events, and how they are dispatched.

A handler is `fn(event_data: dict) -> None`, sync or async: whatever awaitable it returns is
awaited (an `async def`, also behind a plain decorator, or an object with an async `__call__`),
so the result, not the function's look, says how to run it. It registers for event-type patterns
(`"issue.*"`, `"cycle_issue.created"`, `"*"` for every event) and is dispatched either inline in
the relay or as a Celery task. A Celery message names a handler by its registered name; the
worker looks the name up here and never imports anything a message names.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

EventData = dict[str, Any]
HandlerFunc = Callable[[EventData], Any]
Dispatch = Literal["inline", "celery"]
DISPATCH_MODES: tuple[str, ...] = ("inline", "celery")


@dataclass(frozen=True)
class Handler:
    name: str
    func: HandlerFunc = field(compare=False)
    patterns: tuple[str, ...] = ("*",)
    dispatch: Dispatch = "inline"

    def matches(self, event_type: str) -> bool:
        return any(fnmatch.fnmatchcase(event_type, p) for p in self.patterns)


def default_name(func: HandlerFunc) -> str:
    return f"{func.__module__}.{func.__qualname__}"


def checked_patterns(patterns: Iterable[str] | str) -> tuple[str, ...]:
    """The patterns as a tuple, refused at registration when one is not a pattern: a list
    inside the arguments would otherwise raise in the relay on every batch, and a bare
    `@handler` (the function taken as a pattern) would register nothing, silently."""
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not patterns:
        raise ValueError("a handler needs at least one event-type pattern")
    for pattern in patterns:
        if callable(pattern):
            raise TypeError(
                f"{pattern!r} given as an event-type pattern: write @handler() or "
                f"@handler('issue.*'), not a bare @handler"
            )
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"an event-type pattern is a non-empty string, got {pattern!r}")
    return patterns


def _merged_registration(
    existing: Handler, func: HandlerFunc, patterns: tuple[str, ...], dispatch: Dispatch
) -> tuple[str, ...]:
    """The patterns of a name registered again: the same function adds its new patterns, so
    that `add_handler(fn)` after `@handler("issue.*")` on fn does not silently drop events the
    first registration asked for. `==`, not `is`: a bound method is a new object each time."""
    if existing.func != func:
        raise ValueError(f"another handler is already registered as {existing.name!r}")
    if existing.dispatch != dispatch:
        raise ValueError(
            f"{existing.name!r} is already registered with dispatch={existing.dispatch!r}"
        )
    return existing.patterns + tuple(p for p in patterns if p not in existing.patterns)


class HandlerRegistry:
    """Handlers by name, and the handlers of each event type (cached: the relay asks per event)."""

    def __init__(self) -> None:
        self._by_name: dict[str, Handler] = {}
        self._by_event_type: dict[str, tuple[Handler, ...]] = {}
        self._route_by_event_type: dict[str, tuple] = {}

    def add(
        self,
        func: HandlerFunc,
        patterns: Iterable[str] = ("*",),
        *,
        name: str | None = None,
        dispatch: Dispatch = "inline",
    ) -> Handler:
        if not callable(func):
            raise TypeError(f"handler must be callable, got {func!r}")
        if dispatch not in DISPATCH_MODES:
            raise ValueError(f"dispatch must be one of {DISPATCH_MODES}, got {dispatch!r}")
        patterns = checked_patterns(patterns)
        name = name or default_name(func)
        existing = self._by_name.get(name)
        if existing is not None:
            patterns = _merged_registration(existing, func, patterns, dispatch)
        handler = Handler(name, func, patterns, dispatch)
        self._by_name[handler.name] = handler
        self._by_event_type.clear()
        self._route_by_event_type.clear()
        return handler

    def get(self, name: str) -> Handler | None:
        return self._by_name.get(name)

    def route(self, event_type: str) -> tuple[tuple[Handler, ...], tuple[Handler, ...]]:
        """The handlers of an event type that run in the relay, and those sent to Celery.

        Only the first kind needs the payload decoded in the relay; Celery handlers get it
        decoded by the worker."""
        found = self._route_by_event_type.get(event_type)
        if found is None:
            handlers = self.for_event(event_type)
            found = (
                tuple(h for h in handlers if h.dispatch == "inline"),
                tuple(h for h in handlers if h.dispatch == "celery"),
            )
            self._route_by_event_type[event_type] = found
        return found

    def for_event(self, event_type: str) -> tuple[Handler, ...]:
        found = self._by_event_type.get(event_type)
        if found is None:
            found = tuple(h for h in self._by_name.values() if h.matches(event_type))
            self._by_event_type[event_type] = found
        return found

    def __iter__(self):
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)


# The application's handlers, registered by the host's AppConfig.ready() (see plane/handlers.py).
registry = HandlerRegistry()


def handler(
    *patterns: str, dispatch: Dispatch = "inline", name: str | None = None
) -> Callable[[HandlerFunc], HandlerFunc]:
    """Register a function in the application's registry: `@handler("issue.*")`."""

    patterns = checked_patterns(patterns or ("*",))

    def register(func: HandlerFunc) -> HandlerFunc:
        registry.add(func, patterns, name=name, dispatch=dispatch)
        return func

    return register
