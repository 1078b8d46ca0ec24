"""Gang scheduling for a run's pods, so that all of them start together or none does: Kueue's plain pod
groups (labels), Volcano's and scheduler-plugins' coscheduling PodGroups."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_dnntrain.backends.kubernetes.options import GangScheduler


@dataclass(frozen=True)
class Gang:
    scheduler: GangScheduler
    queue_name: str | None = None
    scheduler_name: str | None = None
    timeout_seconds: int = 300


def join_gang(pod: dict, gang: Gang, job: str, size: int) -> dict:
    meta, spec = pod["metadata"], pod["spec"]
    if gang.scheduler == "kueue":  # Kueue's plain pod groups
        meta["labels"]["kueue.x-k8s.io/queue-name"] = gang.queue_name or "default"
        meta["labels"]["kueue.x-k8s.io/pod-group-name"] = job
        meta["annotations"]["kueue.x-k8s.io/pod-group-total-count"] = str(size)
    elif gang.scheduler == "volcano":
        meta["annotations"]["scheduling.k8s.io/group-name"] = job
        spec["schedulerName"] = gang.scheduler_name or "volcano"
    else:  # scheduler-plugins' coscheduling
        meta["labels"]["scheduling.x-k8s.io/pod-group"] = job
        spec["schedulerName"] = gang.scheduler_name or "scheduler-plugins-scheduler"
    return pod


def pod_group(gang: Gang, job: str, meta: dict, size: int) -> dict | None:
    if gang.scheduler == "kueue":
        return None  # Kueue forms the group from the pods' labels
    if gang.scheduler == "volcano":
        spec: dict[str, Any] = {"minMember": size}
        if gang.queue_name:
            spec["queue"] = gang.queue_name
        api = "scheduling.volcano.sh/v1beta1"
    else:
        spec = {"minMember": size, "scheduleTimeoutSeconds": gang.timeout_seconds}
        api = "scheduling.x-k8s.io/v1alpha1"
    return {"apiVersion": api, "kind": "PodGroup", "metadata": {"name": job, **meta}, "spec": spec}
