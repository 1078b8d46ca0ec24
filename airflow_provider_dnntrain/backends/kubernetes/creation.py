"""Creating a Kubernetes run's objects, in the order ownership needs: the owner ConfigMap (plan, source,
bootstrap), the Secret, then the Service and a gang scheduler's PodGroup - or the Kubeflow job, which
makes the pods' Services itself - and the pods (or the job) once every value they start with is known:
a pod's environment cannot change once it runs."""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import time
from collections.abc import Mapping
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.backends.common.bundle import run_bundle
from airflow_provider_dnntrain.backends.common.keys import run_ssh_files
from airflow_provider_dnntrain.backends.kubernetes.cluster import Cluster
from airflow_provider_dnntrain.backends.kubernetes.inputs import SOURCES_KEY
from airflow_provider_dnntrain.backends.kubernetes.job import KubernetesJobHandle
from airflow_provider_dnntrain.backends.kubernetes.kubeflow import kubeflow_kind, render_kubeflow_job
from airflow_provider_dnntrain.backends.kubernetes.manifests import (
    RunObjects,
    RunSettings,
    render_run,
    ssh_nodes,
)
from airflow_provider_dnntrain.backends.kubernetes.secrets import secret_data
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

_SIGNED_URL_SECONDS = 6 * 3600  # how long pods may take to fetch an input, besides starting


class CreationRefused(RuntimeError):
    """The API refused an object of the run: a LimitRange, a quota, an admission webhook, a Role."""


def _refusals_named(create):
    """``create(cluster, handle, ...)`` with an API refusal (4xx) raised as :class:`CreationRefused`,
    saying what the cluster said and no more."""

    @functools.wraps(create)
    def creating(cluster: Cluster, handle: KubernetesJobHandle, *args) -> None:
        try:
            create(cluster, handle, *args)
        except Exception as error:
            status = getattr(error, "status", None)
            if not (isinstance(status, int) and 400 <= status < 500 and hasattr(error, "reason")):
                raise
            try:
                said = json.loads(getattr(error, "body", None) or "{}").get("message", "")
            except ValueError:
                said = ""
            refusal = f"run {handle.run.run_id}: the cluster refused it: {status} {error.reason}: {said}"
            raise CreationRefused(refusal) from error

    return creating


def kubeflow_workload(plan: JobPlan, settings: RunSettings, owner_reference: dict) -> dict:
    """The run's Kubeflow job (TFJob, PyTorchJob or MPIJob), owned like every object of the run."""
    return render_kubeflow_job(
        plan, settings, kubeflow_kind(plan.framework, plan.distribution), owner_reference
    )


@_refusals_named
def create_run(
    cluster: Cluster,
    handle: KubernetesJobHandle,
    job: TrainingJob,
    source: Path,
    secrets: Mapping[str, str],
    startup_timeout: float,
    pull_config: str = "",
) -> None:
    """Every object of the run but the pods, then the pods too unless values are still pending
    (``pull_config``: the run's pull Secret's, if it has one)."""
    run, plan, settings = handle.run, handle.plan, handle.settings
    data = secret_data(secrets, run_ssh_files(run.job) if ssh_nodes(plan) else {})
    if inputs.downloads(job):  # signed URLs and connection headers: credentials, so in the Secret
        data[SOURCES_KEY] = inputs.pod_sources(job, startup_timeout + _SIGNED_URL_SECONDS)
    bundle = run_bundle(source, plan, job.resume_from)
    run.owner_uid = cluster.create_owner(run.namespace, render_run(plan, settings, bundle, data).owner)
    objects = render_run(plan, settings, bundle, data, owner_uid=run.owner_uid, pull_config=pull_config)
    cluster.create_children(run.namespace, objects, with_pods_service=run.workload is None)
    if run.workload is not None:  # the training operator makes the pods and their Services
        handle.pod_manifests = [kubeflow_workload(plan, settings, objects.owner_reference)]
    else:
        handle.pod_manifests = objects.pods
    if not run.awaiting:
        create_pods(cluster, handle)


@_refusals_named
def create_pods(cluster: Cluster, handle: KubernetesJobHandle) -> None:
    """The pods (or the Kubeflow job that makes them), with every value they start with: the variables
    submit was told are pending are part of their environment."""
    run = handle.run
    settings = dataclasses.replace(handle.settings, launch_env={**run.launch_env, **handle.provided})
    if run.workload is not None:
        workload = handle.pod_manifests[0]
        if handle.provided:
            workload = kubeflow_workload(run.plan, settings, workload["metadata"]["ownerReferences"][0])
        cluster.create_workload(run, workload)
    else:
        pods = handle.pod_manifests
        if handle.provided:
            pods = render_run(run.plan, settings, {}, {}, owner_uid=run.owner_uid).pods
        cluster.create_pods(run.namespace, pods)
    handle.watch.created_at = time.monotonic()


def preview(
    job: TrainingJob, plan: JobPlan, settings: RunSettings, source: Path, kubeflow: bool
) -> list[dict]:
    """Every object a run would create (``kubeflow``: in the Kubeflow form), secrets masked and the
    bundle's files shown by size."""
    data = secret_data({name: "***" for name in job.environment.secrets}, {})
    if inputs.downloads(job):
        data[SOURCES_KEY] = "***"
    objects = render_run(plan, settings, run_bundle(source, plan, job.resume_from), data, pull_config="***")
    if kubeflow:
        workload = kubeflow_workload(plan, settings, objects.owner_reference)
        objects = dataclasses.replace(objects, service=None, pods=[], pod_group=None, extra=[workload])
    return masked(objects)


def masked(objects: RunObjects) -> list[dict]:
    """The run's objects as a preview shows them: the bundle's files by size, secret values hidden."""
    shown = json.loads(json.dumps(objects.all()))
    for obj in shown:
        if obj["kind"] == "ConfigMap":
            obj["binaryData"] = {
                k: f"<{len(base64.b64decode(v))} bytes>" for k, v in obj["binaryData"].items()
            }
        if obj["kind"] == "Secret":
            obj["data"] = {k: "***" for k in obj["data"]}
    return shown
