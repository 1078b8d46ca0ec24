"""The Kubeflow form of a run: the job as a TFJob or PyTorchJob (``kubeflow.org/v1``) for clusters that
run the Kubeflow training operator. Pure, no API calls.

The operator creates the pods, a Service per pod (``<job>-<type>-<index>``) and their cluster variables
(``TF_CONFIG``; ``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ``PET_*``). The plan is rendered with the
operator's names, so what the plan says equals what the operator sets. One template per replica type
serves every replica of that type: each pod's bootstrap finds its replica in the plan by its pod name
(the downward API) and runs it with the plan's variables besides the operator's.
The run's ConfigMap (plan, source, bootstrap) owns the job, as it owns the run's Secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_dnntrain.launchers.kubernetes_manifests import (
    BOOTSTRAP,
    ROLE_LABEL,
    RUN_LABEL,
    RunSettings,
    env_list,
    job_name,
    literal,
    main_container,
    merge_pod_template,
    options_for,
    pod_spec,
)
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, Replica

API_VERSION = "kubeflow.org/v1"
POD_NAME_VAR = "DNNTRAIN_POD_NAME"  # the pod's name, by which its bootstrap finds its replica


@dataclass(frozen=True)
class KubeflowKind:
    kind: str
    plural: str
    specs_field: str  # where the replica specs go in the job's spec
    container: str  # the container the operator gives its variables to (its webhook requires it)
    port_name: str
    default_port: int  # the operator's, for a job whose replicas listen on none

    @property
    def group(self) -> str:
        return API_VERSION.split("/")[0]

    @property
    def version(self) -> str:
        return API_VERSION.split("/")[1]


TFJOB = KubeflowKind("TFJob", "tfjobs", "tfReplicaSpecs", "tensorflow", "tfjob-port", 2222)
PYTORCHJOB = KubeflowKind(
    "PyTorchJob", "pytorchjobs", "pytorchReplicaSpecs", "pytorch", "pytorchjob-port", 23456
)
# The operator's replica types, by the plan's role (the types' names are these, capitalised as below).
_TF_TYPES = {"chief": "Chief", "ps": "PS", "worker": "Worker", "evaluator": "Evaluator"}


def kubeflow_kind(framework: str, distribution: str) -> KubeflowKind:
    """The training operator's kind for a job; ``ValueError`` naming what has none."""
    if distribution == "horovod":
        raise ValueError(
            "kubeflow: Horovod jobs have no Kubeflow form here (the operator's MPIJob v1 starts ranks with "
            "kubectl exec, not SSH); run them with kubeflow=False (pods and a headless Service)"
        )
    return PYTORCHJOB if framework == "pytorch" else TFJOB


def replica_type(kind: KubeflowKind, role: str, index: int) -> tuple[str, int]:
    """The operator's (type, index) for the plan's replica: PyTorch's node 0 is the Master, node
    ``i`` is Worker ``i - 1``; TensorFlow's roles are its types."""
    if kind is PYTORCHJOB:
        return ("Master", 0) if index == 0 else ("Worker", index - 1)
    return _TF_TYPES[role], index


class KubeflowPlacement:
    """Replicas where the operator puts them: pod and Service ``<job>-<type>-<index>``. TensorFlow's
    hosts are the operator's ``TF_CONFIG`` names (``<service>.<namespace>.svc``), PyTorch's master is its
    ``MASTER_ADDR`` (the Service's name)."""

    runs_as_root = True

    def __init__(self, run_id: str, namespace: str, kind: KubeflowKind) -> None:
        self.job = job_name(run_id)
        self.namespace = namespace
        self.kind = kind

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        type_, type_index = replica_type(self.kind, role, index)
        name = f"{self.job}-{type_.lower()}-{type_index}"
        host = f"{name}.{self.namespace}.svc" if self.kind is TFJOB else name
        return Endpoint(host, default_port)


def render_kubeflow_job(plan: JobPlan, settings: RunSettings, kind: KubeflowKind, owner_ref: dict) -> dict:
    """The TFJob / PyTorchJob of the run, owned by the run's ConfigMap."""
    job = job_name(plan.run_id)
    by_type: dict[str, list[Replica]] = {}
    for replica in plan.replicas:
        by_type.setdefault(replica_type(kind, replica.role, replica.index)[0], []).append(replica)
    specs = {
        type_: {
            "replicas": len(replicas),
            "restartPolicy": "Never",  # a replica that fails fails the job: gang semantics
            "template": _template(plan, settings, kind, job, replicas),
        }
        for type_, replicas in by_type.items()
    }
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 0}  # pods go with the run
    labels = {RUN_LABEL: job}
    if settings.gang is not None:
        if settings.gang.scheduler == "kueue":  # Kueue admits Kubeflow jobs as a whole by this label
            labels["kueue.x-k8s.io/queue-name"] = settings.gang.queue_name or "default"
        else:  # the operator makes the PodGroup for the scheduler it was started with
            policy: dict[str, Any] = {"minAvailable": len(plan.replicas)}
            if settings.gang.queue_name:
                policy["queue"] = settings.gang.queue_name
            run_policy["schedulingPolicy"] = policy
    spec: dict[str, Any] = {kind.specs_field: specs, "runPolicy": run_policy}
    if kind is PYTORCHJOB:
        spec["nprocPerNode"] = str(plan.world_size // len(plan.replicas))  # processes per node
    return {
        "apiVersion": API_VERSION,
        "kind": kind.kind,
        "metadata": {
            "name": job,
            "namespace": settings.namespace,
            "labels": labels,
            "ownerReferences": [owner_ref],
        },
        "spec": spec,
    }


def _template(plan: JobPlan, settings: RunSettings, kind: KubeflowKind, job: str, replicas: list[Replica]):
    """One pod template for every replica of a type (they differ only in what the plan says)."""
    first = replicas[0]
    options = options_for(settings, first.role)
    main = main_container(plan, settings, options, first, job)
    pod_name_ref = {"name": POD_NAME_VAR, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    main.update(
        name=kind.container,
        command=literal([settings.python, BOOTSTRAP, "run", "--replica-of-pod"]),
        args=[],
        env=[pod_name_ref, *env_list(settings.launch_env, options.env_vars, settings.secret_names, job)],
        ports=[{"name": kind.port_name, "containerPort": _port(plan, kind)}],
    )
    with_outputs = any(r.name == plan.chief.name for r in replicas)
    pod = {
        "metadata": {
            "labels": {**options.labels, RUN_LABEL: job, ROLE_LABEL: first.role},
            "annotations": dict(options.annotations),
        },
        "spec": pod_spec(plan, settings, options, job, main, with_outputs=with_outputs),
    }
    if settings.pod_template:
        pod = merge_pod_template(settings.pod_template, {"apiVersion": "v1", "kind": "Pod", **pod})
    return {"metadata": pod["metadata"], "spec": pod["spec"]}


def _port(plan: JobPlan, kind: KubeflowKind) -> int:
    """The port the replicas listen on (every replica of a TensorFlow job; PyTorch's master)."""
    return next((r.port for r in plan.replicas if r.port), kind.default_port)
