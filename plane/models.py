"""A realistic slice of Plane's domain, whose changes the event stream captures.

Issues are soft-deleted through `deleted_at`, as in Plane. Assignees, labels and cycle
membership are rows of their own and emit their own events.
"""

from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from event_stream.capture import capture_triggers

# Columns whose change alone is not worth an event: bookkeeping and big derived text.
BOOKKEEPING = ("updated_at", "updated_by_id")


class BaseModel(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    updated_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    class Meta:
        abstract = True


class Workspace(BaseModel):
    name = models.CharField(max_length=255)
    slug = models.SlugField(max_length=48, unique=True)

    def __str__(self) -> str:
        return self.name


class Project(BaseModel):
    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="projects")
    name = models.CharField(max_length=255)
    identifier = models.CharField(max_length=12)

    class Meta:
        unique_together = [("workspace", "identifier")]

    def __str__(self) -> str:
        return self.name


class State(BaseModel):
    GROUPS = [(g, g) for g in ("backlog", "unstarted", "started", "completed", "cancelled")]

    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="states")
    name = models.CharField(max_length=255)
    group = models.CharField(max_length=20, choices=GROUPS, default="backlog")
    color = models.CharField(max_length=16, default="#60646C")

    def __str__(self) -> str:
        return self.name


class Label(BaseModel):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="labels")
    name = models.CharField(max_length=255)
    color = models.CharField(max_length=16, blank=True, default="")

    def __str__(self) -> str:
        return self.name


class Issue(BaseModel):
    PRIORITIES = [(p, p) for p in ("urgent", "high", "medium", "low", "none")]

    workspace = models.ForeignKey(Workspace, on_delete=models.CASCADE, related_name="+")
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="issues")
    state = models.ForeignKey(State, null=True, blank=True, on_delete=models.SET_NULL)
    parent = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL)
    name = models.CharField(max_length=255)
    description_html = models.TextField(blank=True, default="<p></p>")
    description_stripped = models.TextField(blank=True, null=True)
    priority = models.CharField(max_length=30, choices=PRIORITIES, default="none")
    sequence_id = models.IntegerField(default=1)
    sort_order = models.FloatField(default=65535)
    estimate_point = models.IntegerField(null=True, blank=True)
    start_date = models.DateField(null=True, blank=True)
    target_date = models.DateField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    is_draft = models.BooleanField(default=False)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        triggers = capture_triggers(
            "issue",
            # sort_order moves on every drag in a board view; description_stripped follows
            # description_html, which is captured.
            ignore=(*BOOKKEEPING, "sort_order", "description_stripped"),
            soft_delete="deleted_at",
        )

    def __str__(self) -> str:
        return self.name


class IssueAssignee(BaseModel):
    issue = models.ForeignKey(Issue, on_delete=models.CASCADE, related_name="issue_assignees")
    assignee = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="issue_assignments"
    )

    class Meta:
        unique_together = [("issue", "assignee")]
        triggers = capture_triggers("issue_assignee", ignore=BOOKKEEPING)


class IssueLabel(BaseModel):
    issue = models.ForeignKey(Issue, on_delete=models.CASCADE, related_name="label_issues")
    label = models.ForeignKey(Label, on_delete=models.CASCADE, related_name="label_issues")

    class Meta:
        unique_together = [("issue", "label")]
        triggers = capture_triggers("issue_label", ignore=BOOKKEEPING)


class Cycle(BaseModel):
    project = models.ForeignKey(Project, on_delete=models.CASCADE, related_name="cycles")
    name = models.CharField(max_length=255)
    description = models.TextField(blank=True, default="")
    start_date = models.DateTimeField(null=True, blank=True)
    end_date = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(null=True, blank=True)
    sort_order = models.FloatField(default=65535)
    deleted_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        triggers = capture_triggers(
            "cycle", ignore=(*BOOKKEEPING, "sort_order"), soft_delete="deleted_at"
        )

    def __str__(self) -> str:
        return self.name


class CycleIssue(BaseModel):
    """An issue's membership of a cycle; moving it to another cycle updates `cycle_id`."""

    cycle = models.ForeignKey(Cycle, on_delete=models.CASCADE, related_name="cycle_issues")
    issue = models.OneToOneField(Issue, on_delete=models.CASCADE, related_name="cycle_issue")

    class Meta:
        triggers = capture_triggers("cycle_issue", ignore=BOOKKEEPING)


# What the example handlers (plane/handlers.py) keep. Not captured: they are the handlers' output.


class WebhookDelivery(models.Model):
    """A webhook POST the receiver accepted; an event delivered again is not sent twice."""

    event_id = models.UUIDField(unique=True)
    event_type = models.CharField(max_length=255)
    entity_id = models.UUIDField(null=True, blank=True)
    url = models.URLField(max_length=2000)
    status_code = models.PositiveSmallIntegerField()
    delivered_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return f"{self.event_type} {self.event_id} -> {self.status_code}"


class SearchDocument(models.Model):
    """An issue as the search index sees it, one row per issue, from its latest event applied."""

    issue_id = models.UUIDField(primary_key=True)
    project_id = models.UUIDField()
    title = models.CharField(max_length=255)
    text = models.TextField(blank=True, default="")
    priority = models.CharField(max_length=30)
    state_id = models.UUIDField(null=True, blank=True)
    deleted = models.BooleanField(default=False)
    # The outbox id of the event applied last: an older event arriving later is ignored.
    last_event_id = models.BigIntegerField()

    def __str__(self) -> str:
        return self.title


class Notification(models.Model):
    """An in-app notification; one per event and receiver, however often the event is handled."""

    event_id = models.UUIDField()
    receiver = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="notifications"
    )
    issue_id = models.UUIDField()
    title = models.CharField(max_length=255)
    message = models.TextField()
    created_at = models.DateTimeField(auto_now_add=True)
    read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["event_id", "receiver"], name="notification_once_per_event"
            )
        ]

    def __str__(self) -> str:
        return self.title
