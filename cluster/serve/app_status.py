"""What Serve says of the applications a deploy submitted.

``deploy`` submits every application at once without waiting for any
(``serve.run_many(..., wait_for_applications_running=False)``), so a pool
that fails is noticed here, from ``serve.status()``, instead of inside
``serve.run``: an application in DEPLOY_FAILED ends the deploy with
``DeployFailed`` naming it and Serve's reason, and one still starting is
described by its deployments' messages (e.g. replicas waiting for resources)
when the deploy times out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from ray.serve.schema import ApplicationStatusOverview, ServeStatus


class DeployFailed(RuntimeError):
    """One or more applications of a deploy reached DEPLOY_FAILED."""


class DeployInProgress(RuntimeError):
    """Another deploy is still applying its config to this cluster."""


@dataclass
class AppsReport:
    """The submitted applications that are not RUNNING, by outcome:
    app name -> Serve's status and reason."""
    failed: dict[str, str] = field(default_factory=dict)
    starting: dict[str, str] = field(default_factory=dict)

    def raise_failed(self) -> None:
        if self.failed:
            raise DeployFailed("; ".join(f"application {a!r} failed to deploy: {m}"
                                         for a, m in self.failed.items()))


TRACEBACK = "Traceback (most recent call last):"


def last_line(text: str) -> str:
    """The last non-blank line of ``text`` (of a traceback: the exception
    raised), stripped; "" when it has none."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _condensed(message: str) -> str:
    """``message`` with a Python traceback in it cut to Serve's first line
    and the traceback's last (the exception raised, e.g. a constructor's
    ``OSError: ... cannot listen on 127.0.0.1:8000 ...``): the frames of
    Serve's replica wrapper fill a terminal and hide what went wrong; they
    stay in the replica's log."""
    lines = message.strip().splitlines()
    if TRACEBACK not in message or len([ln for ln in lines if ln.strip()]) < 2:
        return message
    return f"{lines[0].strip()} {last_line(message)}"


def _reason(app: ApplicationStatusOverview) -> str:
    """The application's own message, else its deployments' (Serve puts a
    replica constructor's error, or the resources a replica waits for, on
    the deployment); a traceback is cut to its last line (``_condensed``)."""
    notes = [_condensed(app.message)] if app.message else []
    notes += [f"{name}: {_condensed(d.message)}" for name, d in app.deployments.items()
              if d.message]
    status = getattr(app.status, "value", app.status)
    return f"{status}" + (f": {' | '.join(notes)}" if notes else "")


def report(status: ServeStatus, apps: Iterable[str]) -> AppsReport:
    """Sort ``apps`` that are not RUNNING in ``status`` into failed and
    starting. An application Serve does not list (deleted since it was
    submitted) counts as failed."""
    out = AppsReport()
    for name in apps:
        app = status.applications.get(name)
        if app is None:
            out.failed[name] = "Serve does not list it (deleted while it deployed?)"
        elif app.status == "DEPLOY_FAILED":
            out.failed[name] = _reason(app)
        elif app.status != "RUNNING":
            out.starting[name] = _reason(app)
    return out
