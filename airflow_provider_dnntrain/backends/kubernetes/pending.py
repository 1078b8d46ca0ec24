"""A pod that has not started yet: waiting its turn, or stuck? On a real cluster pods wait for minutes
for good reasons - Kueue holds them behind a scheduling gate until the queue admits the workload, a
gang scheduler until the whole group fits, the cluster autoscaler while it adds a node, kubelet while
it retries an image pull the registry throttled. None of that is a failure; a pod no node can ever
take, an image that does not exist or a Secret key that is missing is, and is said at once.

Three bounds (:class:`PodTimeouts`): ``schedule`` (created → scheduled; ``None``: as long as the
task's own timeout allows while a queue, gang scheduler, gate or scale-up holds the pod, else the
startup bound), ``startup`` (scheduled → running: pulls, init steps) and ``image_pull`` (kubelet's
retries of a pull that may yet succeed).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

NOT_SCHEDULED = "not scheduled"
# Pulls that will never succeed: the registry says the image is not there (or that these credentials
# may not read it), or the name is wrong.
_IMAGE_MISSING = (
    "not found",
    "manifest unknown",
    "repository does not exist",
    "name unknown",
    "unauthorized",
)
_NEVER_PULLED = ("InvalidImageName", "ErrImageNeverPull")
_PULLING = ("ErrImagePull", "ImagePullBackOff")
_CONFIG_MISSING = ("CreateContainerConfigError",)  # a Secret, ConfigMap or key that is not there
NOTE_SECONDS = 60.0  # how often the task log says what pods wait for...
FIRST_NOTE_SECONDS = 10.0  # ...first once they have waited this long


@dataclass(frozen=True)
class PodTimeouts:
    startup: float = 120.0
    schedule: float | None = None
    image_pull: float = 300.0
    queued: bool = False  # a queue or gang scheduler starts the pods together, when they all fit
    orphan: float | None = None  # the run's lease: its pods end themselves once it lapses this long

    @property
    def renew_every(self) -> float | None:
        """How often whoever watches the run renews its lease: well within ``orphan``."""
        return None if not self.orphan else min(30.0, max(1.0, self.orphan / 6))

    def schedule_limit(self, held: bool) -> float | None:
        """How long a pod may wait to be scheduled; ``held``: by a gate or a scale-up under way."""
        if self.schedule is not None:
            return self.schedule
        return None if self.queued or held else self.startup

    def arguments(self) -> dict:
        return {"startup": self.startup, "schedule": self.schedule, "image_pull": self.image_pull,
                "queued": self.queued, "orphan": self.orphan}  # fmt: skip


@dataclass
class Waits:
    """When this process first saw each pod scheduled, and each pod's image pull failing; when the
    task log last said what the pods wait for."""

    scheduled_at: dict[str, float] = field(default_factory=dict)
    pulling_since: dict[str, float] = field(default_factory=dict)
    noted_at: float = 0.0


def pending_failure(pod, name: str, created_at: float, waits: Waits, timeouts: PodTimeouts, scaling_up: bool):
    """Why ``pod`` (the API's object, Pending) cannot start, if it cannot: a text, else ``None``."""
    now = time.monotonic()
    status = pod.status
    scheduled = _condition(status, "PodScheduled")
    if scheduled is None or scheduled.status != "True":
        held = bool(pod.spec.scheduling_gates) or scaling_up
        limit = timeouts.schedule_limit(held)
        if limit is not None and now - created_at > limit:
            why = _reason(scheduled) or NOT_SCHEDULED
            return f"was not scheduled within {limit:.0f} s ({why})"
        return None
    since = waits.scheduled_at.setdefault(name, now)
    failure, pulling = _waiting_failure(status, name, waits, timeouts, now)
    if failure is not None or pulling:  # a pull kubelet retries has its own bound
        return failure
    if now - since > timeouts.startup:
        return f"was scheduled but not running after {timeouts.startup:.0f} s ({_waiting_reasons(status)})"
    return None


def _waiting_failure(status, name: str, waits: Waits, timeouts: PodTimeouts, now: float):
    """(why a container of the pod will not start, if it will not; whether kubelet retries a pull)"""
    for container in status.container_statuses or []:
        waiting = container.state.waiting if container.state else None
        if waiting is None:
            continue
        what = f"cannot start: {waiting.reason}: {waiting.message or ''}".rstrip(": ")
        if waiting.reason in (*_NEVER_PULLED, *_CONFIG_MISSING):
            return what, False
        if waiting.reason in _PULLING:
            if any(text in (waiting.message or "").lower() for text in _IMAGE_MISSING):
                return what, False
            if now - waits.pulling_since.setdefault(name, now) > timeouts.image_pull:
                return f"{what} (kubelet kept retrying for {timeouts.image_pull:.0f} s)", True
            return None, True
    waits.pulling_since.pop(name, None)
    return None, False


def waiting_note(pods: list, queue: str | None) -> str | None:
    """What the run's pods that have not started wait for, in a line (``None``: none waits)."""
    waiting = {}
    for pod in pods:
        if pod.status is None or pod.status.phase != "Pending":
            continue
        scheduled = _condition(pod.status, "PodScheduled")
        if scheduled is None or scheduled.status != "True":
            why = "a scheduling gate" if pod.spec.scheduling_gates else _reason(scheduled) or NOT_SCHEDULED
            waiting.setdefault(f"to be scheduled: {why}", []).append(pod.metadata.name)
        else:
            waiting.setdefault(f"to start: {_waiting_reasons(pod.status)}", []).append(pod.metadata.name)
    if not waiting:
        return None
    parts = [f"{len(names)} wait {what}" for what, names in sorted(waiting.items())]
    return "; ".join(parts) + (f" (queue {queue})" if queue else "")


def unscheduled_too_long(pod, created_at: float, timeouts: PodTimeouts) -> bool:
    """Whether a pod no gate holds has waited past the bound that applies unless the cluster
    autoscaler is adding a node for it (worth asking the events, then)."""
    if pod.status is None or pod.status.phase != "Pending" or pod.spec.scheduling_gates:
        return False
    scheduled = _condition(pod.status, "PodScheduled")
    limit = timeouts.schedule_limit(held=False)
    unscheduled = scheduled is None or scheduled.status != "True"
    return unscheduled and limit is not None and time.monotonic() - created_at > limit


def _condition(status, kind: str):
    return next((c for c in (status.conditions or []) if c.type == kind), None) if status else None


def _reason(condition) -> str:
    if condition is None or not condition.reason:
        return ""
    return f"{condition.reason}: {condition.message}" if condition.message else condition.reason


def _waiting_reasons(status) -> str:
    reasons = [
        f"{c.name}: {c.state.waiting.reason}"
        for c in [*(status.init_container_statuses or []), *(status.container_statuses or [])]
        if c.state and c.state.waiting and c.state.waiting.reason
    ]
    return ", ".join(reasons) or "starting"
