"""Gang semantics over a Kubernetes run's pods: from one list of them (and, for a Kubeflow job, the
training operator's verdict), whether the job runs, succeeded or failed, and why."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_dnntrain.backends.base import JobState, JobStatus, aggregate_status
from airflow_provider_dnntrain.backends.kubernetes.pending import (
    FIRST_NOTE_SECONDS,
    NOTE_SECONDS,
    PodTimeouts,
    Waits,
    pending_failure,
    unscheduled_too_long,
    waiting_note,
)
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun


@dataclass
class PodWatch:
    """What this process has learnt of a run's pods: when they were created (monotonic), which were
    listed at least once, and each replica's main container's exit code (``None`` while it runs)."""

    created_at: float | None = None
    seen: set[str] = field(default_factory=set)
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    waits: Waits = field(default_factory=Waits)
    scaling_up: set[str] = field(default_factory=set)  # pods the cluster autoscaler is adding a node for

    def started_long_ago(self, startup_timeout: float) -> bool:
        return self.created_at is not None and time.monotonic() - self.created_at > startup_timeout

    def note_due(self, pods: list[Any], gang) -> str | None:
        """What the pods that have not started wait for, once a minute while they wait."""
        now = time.monotonic()
        if self.created_at is None:
            return None
        since_note = now - self.waits.noted_at if self.waits.noted_at else float("inf")
        if now - self.created_at < FIRST_NOTE_SECONDS or since_note < NOTE_SECONDS:
            return None
        note = waiting_note(pods, gang.queue_name if gang is not None else None)
        if note is not None:
            self.waits.noted_at = now
        return note


def pods_to_ask_about(watch: PodWatch, pods: list[Any], timeouts: PodTimeouts) -> list[str]:
    """Pods past their bound to be scheduled, unless the cluster autoscaler is adding a node for them:
    their events say whether it is."""
    if watch.created_at is None:
        return []
    return [
        pod.metadata.name
        for pod in pods
        if pod.metadata.name not in watch.scaling_up and unscheduled_too_long(pod, watch.created_at, timeouts)
    ]


def evaluate(
    run: KubernetesRun, watch: PodWatch, pods: list[Any], timeouts: PodTimeouts, workload: dict | None = None
) -> JobStatus:
    """Gang semantics over the pods (the API's objects from one list call) and, for a Kubeflow job, its
    conditions (``workload``: the job as the API gave it)."""
    if watch.created_at is None:
        return JobStatus(JobState.RUNNING)
    by_name = {p.metadata.name: p for p in pods}
    watch.seen.update(by_name)
    replicas = {r.name for r in run.plan.replicas}
    for name in run.pod_names:
        pod = by_name.get(name)
        failure = _pod_failure(run, watch, name, pod, timeouts)
        if failure is not None:
            return failure
        code = _main_exit_code(pod, run.container)
        replica = run.replica_of(name)
        if replica in replicas:
            watch.exit_codes[replica] = code
        elif code is not None:  # a node a runner reaches over SSH must run until the end
            return _failed(replica, name, f"ended (exit code {code}) while the job ran", code)
    status = aggregate_status(run.plan, watch.exit_codes)
    if status.state is JobState.FAILED:  # the replica's own account, with its name and exit code
        return status
    return _workload_failure(run, workload) or status


def main_container_started(pod, container: str) -> bool:
    for status in (pod.status.container_statuses or []) if pod.status else []:
        if status.name == container and status.state:
            return bool(status.state.running or status.state.terminated)
    return False


def deleted_workload() -> dict:
    """A Kubeflow job the API no longer has, as the verdict it amounts to."""
    failed = {"type": "Failed", "status": "True", "reason": "Deleted", "message": "the job was deleted"}
    return {"status": {"conditions": [failed]}}


def _main_exit_code(pod, container: str) -> int | None:
    for status in (pod.status.container_statuses or []) if pod is not None and pod.status else []:
        if status.name == container and status.state and status.state.terminated:
            return status.state.terminated.exit_code
    return None


def _failed(replica: str, pod: str, what: str, code: int | None = None) -> JobStatus:
    return JobStatus(
        JobState.FAILED, f"replica {replica} (pod {pod}) {what}", failed_replica=replica, exit_code=code
    )


def _pod_failure(
    run: KubernetesRun, watch: PodWatch, name: str, pod, timeouts: PodTimeouts
) -> JobStatus | None:
    """A reason the job cannot go on because of this pod, if it has one."""
    replica = run.replica_of(name)
    if pod is None and run.workload is not None and name not in watch.seen:  # the operator makes it
        if not watch.started_long_ago(timeouts.startup):
            return None
        what = f"was not created by the training operator within {timeouts.startup:.0f} s"
        return _failed(replica, name, f"{what} (is the Kubeflow training operator running?)")
    if pod is None or pod.metadata.deletion_timestamp is not None:
        return _failed(replica, name, "was deleted while the job ran")
    status = pod.status
    if (killed := _out_of_memory(pod, run.container)) is not None:
        return _failed(replica, name, killed, 137)
    if status is not None and status.phase == "Failed" and status.reason:  # evicted, preempted, node lost
        return _failed(replica, name, f"was stopped by Kubernetes: {status.reason}: {status.message or ''}")
    if status is not None and status.phase == "Failed" and _main_exit_code(pod, run.container) is None:
        return _failed(replica, name, _init_failure(status))
    if status is not None and status.phase == "Pending":
        scaling_up = name in watch.scaling_up
        failure = pending_failure(pod, name, watch.created_at, watch.waits, timeouts, scaling_up)
        return None if failure is None else _failed(replica, name, failure)
    return None


def _out_of_memory(pod, container: str) -> str | None:
    """How the pod's main container went past its memory limit, if it was killed for that."""
    for status in (pod.status.container_statuses or []) if pod.status else []:
        ended = status.state.terminated if status.name == container and status.state else None
        if ended is not None and ended.reason == "OOMKilled":
            spec = next((c for c in pod.spec.containers if c.name == container), None)
            limit = ((spec.resources.limits or {}) if spec and spec.resources else {}).get("memory", "?")
            return f"was OOMKilled: it went past its memory limit of {limit} (exit code {ended.exit_code})"
    return None


def _init_failure(status) -> str:
    for container in status.init_container_statuses or []:
        ended = container.state.terminated if container.state else None
        if ended is not None and ended.exit_code:
            return f"failed before it ran: init container {container.name} exited with code {ended.exit_code}"
    return "failed before its main container ran"


def _workload_failure(run: KubernetesRun, workload: dict | None) -> JobStatus | None:
    """The training operator's verdict when it failed the job for a reason no pod shows."""
    conditions = ((workload or {}).get("status") or {}).get("conditions") or []
    for condition in conditions:
        if condition.get("type") == "Failed" and condition.get("status") == "True":
            reason = f"{condition.get('reason', '')}: {condition.get('message', '')}".strip(": ")
            message = f"job {run.run_id}: the training operator failed it: {reason}"
            return JobStatus(JobState.FAILED, message)
    return None
