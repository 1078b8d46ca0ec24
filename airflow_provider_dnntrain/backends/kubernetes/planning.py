"""A job's plan as a Kubernetes run has it: every replica on a pod of its own (or where a Kubeflow
operator puts it), inputs where the pods find them, Horovod's nodes' sshd on the run's port."""

from __future__ import annotations

from typing import Any

from airflow_provider_dnntrain.backends.kubernetes.inputs import place_inputs
from airflow_provider_dnntrain.backends.kubernetes.kubeflow import KubeflowPlacement, kubeflow_kind
from airflow_provider_dnntrain.backends.kubernetes.manifests import SSH_PORT, job_name
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, render_plan


class PodPlacement:
    """Every replica on a pod of its own, at ``<job>-<role>-<index>.<job>``, on the topology's port."""

    runs_as_root = True  # images run as root unless a security context says otherwise; the flag is harmless

    def __init__(self, run_id: str) -> None:
        self.job = job_name(run_id)

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        return Endpoint(f"{self.job}-{role}-{index}.{self.job}", default_port)


def render_pod_plan(job: TrainingJob, run_id: str, namespace: str, python: str, kubeflow: bool) -> JobPlan:
    """The plan of ``job`` as run ``run_id`` in ``namespace`` (``kubeflow``: as a Kubeflow job)."""
    job = place_inputs(job)
    if kubeflow:
        kind = kubeflow_kind(job.framework, job.distribution.kind)
        placement: Any = KubeflowPlacement(run_id, namespace, kind)
    else:
        job, placement = with_ssh_port(job), PodPlacement(run_id)
    return render_plan(job, run_id, placement, python)


def with_ssh_port(job: TrainingJob) -> TrainingJob:
    """Horovod's nodes run sshd on the run's port (unprivileged, so it runs as any user)."""
    dist = job.distribution
    if getattr(dist, "kind", "") == "horovod" and dist.ssh_port is None:
        return job.model_copy(update={"distribution": dist.model_copy(update={"ssh_port": SSH_PORT})})
    return job
