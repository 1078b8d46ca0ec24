"""Deferrable waits, one per backend that needs one; what they share: the job's deadline and the event."""

from __future__ import annotations

import time
from typing import Any

from airflow_provider_dnntrain.backends.base import JobState, JobStatus


def serialized(trigger, *names: str) -> tuple[str, dict[str, Any]]:
    """What ``serialize`` returns: the trigger's class path, and its attributes ``names`` (its arguments)."""
    return f"{type(trigger).__module__}.{type(trigger).__qualname__}", {n: getattr(trigger, n) for n in names}


def job_deadline(timeout: float | None, deadline: float | None) -> float | None:
    """Wall clock, so that a trigger re-created on another triggerer keeps the job's deadline."""
    if deadline is not None:
        return deadline
    return time.time() + timeout if timeout else None


def past_deadline(status: JobStatus, run_id: str, timeout: float | None, deadline: float | None) -> JobStatus:
    """``status``, or a failure once a job still running has outlived its deadline."""
    if not status.state.finished and deadline and time.time() > deadline:
        return JobStatus(JobState.FAILED, f"job {run_id} timed out after {timeout:.0f}s")
    return status


def job_event(handle: Any, status: JobStatus) -> dict[str, Any]:
    """What a trigger hands back to ``execute_complete``: the job's state, outcome and replicas' tails."""
    return {
        "state": handle.to_state(),
        "status": status.state.value,
        "message": status.message,
        "failed_replica": status.failed_replica,
        "exit_code": status.exit_code,
        "tails": {name: list(tail) for name, tail in handle.tails.items()},
    }


def job_status_of(event: dict[str, Any]) -> JobStatus:
    """The job's outcome as a trigger's event (:func:`job_event`) carries it."""
    failed = event.get("failed_replica")
    return JobStatus(
        JobState(event["status"]),
        event["message"],
        failed_replica=failed,
        exit_code=event.get("exit_code"),
        last_lines=event.get("tails", {}).get(failed or "", []),
    )
