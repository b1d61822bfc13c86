"""`python manage.py outbox_demo`: watch changes flow from Plane's models to the handlers.

Migrates the database (the embedded PostgreSQL when DATABASE_URL is unset), then runs the relay
with the application's handlers while a writer thread creates, edits, assigns, labels, plans
and deletes issues through the ORM. Each change goes through the capture triggers into the
outbox, and the relay hands it to the handlers. A line a second shows the counts.
Stop with Ctrl-C (the relay finishes its batch first), or let --seconds run out.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter

from django.contrib.auth.models import User
from django.core.management import call_command
from django.db import close_old_connections, connection, transaction
from django.utils import timezone

from event_stream.database import conninfo_from_django
from event_stream.handlers import HandlerRegistry
from event_stream.handlers import registry as app_registry
from event_stream.management.parsing import StrictFlagsCommand
from event_stream.models import Outbox
from event_stream.poller import OutboxPoller, run_until_signalled
from event_stream.settings import load_settings
from plane.models import (
    Cycle,
    CycleIssue,
    Issue,
    IssueAssignee,
    IssueLabel,
    Label,
    Project,
    State,
    Workspace,
)


class Command(StrictFlagsCommand):
    help = "Run the relay on live issue changes and show events flowing to the handlers."

    def add_arguments(self, parser):
        parser.add_argument("--seconds", type=float, default=20.0, help="how long (default 20)")
        parser.add_argument("--rate", type=float, default=20.0, help="changes per second (20)")

    def handle(self, *args, seconds: float, rate: float, **options):
        self.stdout.write("Migrating the database (installs the capture triggers)...")
        call_command("migrate", verbosity=0)
        handled: Counter = Counter()
        registry = HandlerRegistry()
        for handler in app_registry:
            registry.add(handler.func, handler.patterns, name=handler.name, dispatch="inline")
        registry.add(lambda event: handled.update([event["event_type"]]), name="demo.counter")
        names = ", ".join(h.name for h in app_registry) or "none"
        self.stdout.write(f"Handlers: {names}, plus a counter.")

        poller = OutboxPoller(
            settings=load_settings(),
            conninfo=conninfo_from_django(connection.settings_dict),
            registry=registry,
            after_batch=close_old_connections,
        )
        writer = ChangeWriter(rate)
        writer.start()
        try:
            asyncio.run(self._run(poller, writer, handled, seconds))
        finally:
            writer.stop()
        self.stdout.write(self.style.SUCCESS(
            f"Done: {writer.changes} changes written, {sum(handled.values())} events handled."
        ))  # fmt: skip
        for event_type, count in sorted(handled.items()):
            self.stdout.write(f"  {event_type:<26} {count}")

    async def _run(self, poller, writer, handled, seconds):
        relay = asyncio.create_task(run_until_signalled(poller))
        started = time.monotonic()
        while not relay.done():
            await asyncio.sleep(1.0)
            pending = await asyncio.to_thread(_pending_count)
            self.stdout.write(
                f"[{time.monotonic() - started:5.1f}s] changes written {writer.changes:5d} | "
                f"events handled {sum(handled.values()):5d} | pending {pending:4d} | "
                f"last: {writer.last}"
            )
            if time.monotonic() - started >= seconds and not poller.stopping:
                writer.stop()
                await asyncio.to_thread(writer.join, 5)
                await self._drain(started=time.monotonic())
                poller.stop()
        await relay

    async def _drain(self, started: float, timeout: float = 10.0) -> None:
        """Let the relay catch up with the last changes before stopping it."""
        while await asyncio.to_thread(_pending_count) and time.monotonic() - started < timeout:
            await asyncio.sleep(0.1)


def _pending_count() -> int:
    try:
        return Outbox.objects.pending().count()
    finally:
        close_old_connections()


class ChangeWriter(threading.Thread):
    """Plays a team at work: each step is one transaction of ORM writes."""

    def __init__(self, rate: float):
        super().__init__(name="demo-writer", daemon=True)
        self.rate = rate
        self.changes = 0
        self.last = "-"
        self._stop_event = threading.Event()
        self._random = random.Random(7)

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        try:
            self._setup()
            while not self._stop_event.wait(1.0 / self.rate):
                with transaction.atomic():
                    self.last = self._step()
                self.changes += 1
        finally:
            connection.close()

    def _setup(self) -> None:
        suffix = timezone.now().strftime("%H%M%S%f")
        self.users = [User.objects.get_or_create(username=n)[0] for n in ("ada", "grace", "linus")]
        workspace = Workspace.objects.create(name="Demo", slug=f"demo-{suffix}")
        self.project = Project.objects.create(workspace=workspace, name="Demo", identifier="DEMO")
        self.states = [
            State.objects.create(project=self.project, name=name, group=group)
            for name, group in (("Todo", "unstarted"), ("Doing", "started"), ("Done", "completed"))
        ]
        self.labels = [Label.objects.create(project=self.project, name=n) for n in ("bug", "ux")]
        self.cycles = [
            Cycle.objects.create(project=self.project, name=f"Sprint {n}") for n in (1, 2)
        ]
        self.issues: list[Issue] = []

    def _step(self) -> str:
        pick = self._random.choice
        if len(self.issues) < 5 or self._random.random() < 0.25:
            issue = Issue.objects.create(
                workspace_id=self.project.workspace_id,
                project=self.project,
                name=f"Issue {len(self.issues) + 1}",
                state=self.states[0],
                sequence_id=len(self.issues) + 1,
            )
            self.issues.append(issue)
            return f"created {issue.name}"
        issue = pick(self.issues)
        action = pick(("state", "priority", "assign", "label", "cycle", "rename", "delete"))
        if action == "state":
            issue.state = pick(self.states)
            issue.save()
        elif action == "priority":
            issue.priority = pick(("urgent", "high", "medium", "low"))
            issue.save()
        elif action == "assign":
            IssueAssignee.objects.get_or_create(issue=issue, assignee=pick(self.users))
        elif action == "label":
            IssueLabel.objects.get_or_create(issue=issue, label=pick(self.labels))
        elif action == "cycle":
            CycleIssue.objects.update_or_create(issue=issue, defaults={"cycle": pick(self.cycles)})
        elif action == "rename":
            issue.name = f"{issue.name.split(' (')[0]} (edited)"
            issue.save()
        else:
            issue.deleted_at = timezone.now()
            issue.save()
            self.issues.remove(issue)
        return f"{action} {issue.name}"
