"""A Kubernetes run as it is saved: what another process (the trigger, the task's next try) needs to take
it over - JSON, no secret (those are in the run's Secret) - and the names its objects are found by."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.kubernetes.manifests import (
    MAIN_CONTAINER,
    RUN_LABEL,
    pod_hosts,
    pod_name,
)
from airflow_provider_dnntrain.topology import JobPlan


@dataclass
class KubernetesRun:
    run_id: str
    plan: JobPlan
    job: str  # the name of the run's objects (``job_name(run_id)``)
    namespace: str
    run_dir: Path  # on the worker that started it: plan, artifacts
    launch_id: str
    owner_uid: str = ""  # the run's ConfigMap, which owns every other object of the run
    launch_env: dict[str, str] = field(default_factory=dict)  # every replica's; no secrets
    awaiting: set[str] = field(default_factory=set)  # variables the pods wait for before they are made
    pods_created: bool = False
    container: str = MAIN_CONTAINER  # the replicas' container: its log is the replica's
    workload: dict | None = None  # the Kubeflow job that makes the pods (group, version, plural)
    relay_port: int | None = None  # where the embedded tracking store is served to the pods
    relay_uri: str | None = None
    cursors: dict[str, list] = field(default_factory=dict)  # pod -> [last timestamp, lines at it] logged

    @property
    def selector(self) -> str:
        """The label selector of every pod of the run."""
        return f"{RUN_LABEL}={self.job}"

    @property
    def pod_names(self) -> list[str]:
        return [pod_name(host) for host, _ in pod_hosts(self.plan)]

    def replica_of(self, pod: str) -> str:
        """The replica a pod runs, or for a node a runner reaches over SSH, ``node-<i>``."""
        for host, replica in pod_hosts(self.plan):
            if pod_name(host) == pod:
                return replica.name if replica is not None else pod[len(self.job) + 1 :]
        return pod[len(self.job) + 1 :]

    def to_state(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "plan": self.plan.to_dict(),
            "job": self.job,
            "namespace": self.namespace,
            "run_dir": str(self.run_dir),
            "launch_id": self.launch_id,
            "owner_uid": self.owner_uid,
            "cursors": self.cursors,
            "relay_port": self.relay_port,
            "relay_uri": self.relay_uri,
            "pods_created": self.pods_created,
            "awaiting": sorted(self.awaiting),
            "launch_env": self.launch_env,
            "container": self.container,
            "workload": self.workload,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> KubernetesRun:
        return cls(
            run_id=state["run_id"],
            plan=JobPlan.from_dict(state["plan"]),
            job=state["job"],
            namespace=state["namespace"],
            run_dir=Path(state["run_dir"]),
            launch_id=state["launch_id"],
            owner_uid=state["owner_uid"],
            launch_env=dict(state["launch_env"]),
            awaiting=set(state["awaiting"]),
            pods_created=state["pods_created"],
            container=state.get("container", MAIN_CONTAINER),
            workload=state.get("workload"),
            relay_port=state.get("relay_port"),
            relay_uri=state["relay_uri"],
            cursors=dict(state["cursors"]),
        )
