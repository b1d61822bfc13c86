"""Small builders for Plane's domain, used by integration tests and the benchmarks."""

from __future__ import annotations

import itertools

from plane.models import Issue, Project, State, Workspace

_counter = itertools.count(1)


def make_project() -> Project:
    n = next(_counter)
    workspace = Workspace.objects.create(name=f"Workspace {n}", slug=f"ws-{n}")
    return Project.objects.create(workspace=workspace, name=f"Project {n}", identifier=f"P{n}")


def make_state(project: Project, name: str = "Todo") -> State:
    return State.objects.create(project=project, name=name, group="unstarted")


def issue_for(project: Project, **fields) -> Issue:
    """An unsaved issue of `project`."""
    fields.setdefault("name", "An issue")
    return Issue(workspace_id=project.workspace_id, project=project, **fields)
