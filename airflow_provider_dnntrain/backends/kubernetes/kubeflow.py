"""The Kubeflow form of a run: the job as a TFJob, PyTorchJob or MPIJob (``kubeflow.org/v1``) for clusters
that run the Kubeflow training operator. Pure, no API calls.

The operator creates the pods, a Service per pod (``<job>-<type>-<index>``) and their cluster variables
(``TF_CONFIG``; ``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ``PET_*``). The plan is rendered with the
operator's names, so what the plan says equals what the operator sets. One template per replica type
serves every replica of that type: each pod's bootstrap finds its replica in the plan by its pod name
(the downward API) and runs it with the plan's variables besides the operator's.
An MPIJob (Horovod) is a launcher pod ``<job>-launcher`` that runs ``mpirun`` and worker pods
``<job>-worker-<i>`` that hold the ranks: the operator's ``kubexec.sh`` is mpirun's remote shell (ranks
start through ``kubectl exec``), and its hostfile names the worker pods, as the plan's does. Workers
unpack the source in an init container, so a worker is Running only once the ranks' files are there (the
launcher's ``kubectl-delivery`` waits for every worker to be Running and Ready).
The run's ConfigMap (plan, source, bootstrap) owns the job, as it owns the run's Secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from airflow_provider_dnntrain.backends.kubernetes.manifests import (
    BOOTSTRAP,
    MAIN_CONTAINER,
    ROLE_LABEL,
    RUN_LABEL,
    RunSettings,
    env_list,
    job_name,
    lease_arguments,
    literal,
    main_container,
    options_for,
    outputs_host,
    pod_spec,
)
from airflow_provider_dnntrain.backends.kubernetes.options import PodOptions, merge_pod_template
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, Replica

API_VERSION = "kubeflow.org/v1"
POD_NAME_VAR = "DNNTRAIN_POD_NAME"  # the pod's name, by which its bootstrap finds its replica


@dataclass(frozen=True)
class KubeflowKind:
    kind: str
    plural: str
    specs_field: str  # where the replica specs go in the job's spec
    container: str  # the container the operator gives its variables to (its webhook requires it)
    port_name: str | None  # the replicas' port (None: an MPIJob's pods listen on none of the operator's)
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
# mpirun's first container is the one ``kubexec.sh`` execs ranks in: named in the job (``mainContainer``).
MPIJOB = KubeflowKind("MPIJob", "mpijobs", "mpiReplicaSpecs", MAIN_CONTAINER, None, 0)
# The operator's replica types, by the plan's role (the types' names are these, capitalised as below).
_TF_TYPES = {"chief": "Chief", "ps": "PS", "worker": "Worker", "evaluator": "Evaluator"}
_MPI_TYPES = {"launcher": "Launcher", "node": "Worker"}


def kubeflow_kind(framework: str, distribution: str) -> KubeflowKind:
    """The training operator's kind for a job."""
    if distribution == "horovod":
        return MPIJOB
    return PYTORCHJOB if framework == "pytorch" else TFJOB


def kubeflow_run_fields(job: TrainingJob) -> dict:
    """A run's fields when the training operator makes its pods: whose container is the replica's, and
    the Kubeflow job's resource (group, version, plural)."""
    kind = kubeflow_kind(job.framework, job.distribution.kind)
    return {
        "container": kind.container,
        "workload": {"group": kind.group, "version": kind.version, "plural": kind.plural},
    }


def check_kubeflow(job: TrainingJob) -> None:
    """``ValueError`` naming the field of a job the Kubeflow form cannot run as asked."""
    dist = job.distribution
    if dist.kind != "horovod":
        return
    if dist.runner != "mpirun":
        raise ValueError(
            "distribution.runner: an MPIJob's launcher starts ranks through the operator's kubectl exec, "
            "which horovodrun cannot use (it checks SSH to every host first); set runner='mpirun', "
            "controller='mpi' for kubeflow=True"
        )
    if dist.ssh_port is not None:
        raise ValueError("distribution.ssh_port: an MPIJob starts ranks through kubectl exec; unset it")


def replica_type(kind: KubeflowKind, role: str, index: int) -> tuple[str, int]:
    """The operator's (type, index) for the plan's replica: PyTorch's node 0 is the Master, node
    ``i`` is Worker ``i - 1``; TensorFlow's roles are its types; an MPIJob's nodes are its Workers."""
    if kind is PYTORCHJOB:
        return ("Master", 0) if index == 0 else ("Worker", index - 1)
    if kind is MPIJOB:
        return _MPI_TYPES[role], index
    return _TF_TYPES[role], index


class KubeflowPlacement:
    """Replicas where the operator puts them: pod and Service ``<job>-<type>-<index>``. TensorFlow's
    hosts are the operator's ``TF_CONFIG`` names (``<service>.<namespace>.svc``), PyTorch's master is its
    ``MASTER_ADDR`` (the Service's name), an MPIJob's hosts are its hostfile's (the worker pods' names)
    and its launcher is a pod of its own, ``<job>-launcher``."""

    runs_as_root = True

    def __init__(self, run_id: str, namespace: str, kind: KubeflowKind) -> None:
        self.job = job_name(run_id)
        self.namespace = namespace
        self.kind = kind
        self.launcher_apart = kind is MPIJOB

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        type_, type_index = replica_type(self.kind, role, index)
        name = f"{self.job}-{type_.lower()}-{type_index}"
        if type_ == "Launcher":
            name = f"{self.job}-launcher"
        host = f"{name}.{self.namespace}.svc" if self.kind is TFJOB else name
        return Endpoint(host, default_port)


def render_kubeflow_job(plan: JobPlan, settings: RunSettings, kind: KubeflowKind, owner_ref: dict) -> dict:
    """The TFJob / PyTorchJob / MPIJob of the run, owned by the run's ConfigMap."""
    job = job_name(plan.run_id)
    by_type: dict[str, list[Replica]] = {}
    for replica in plan.replicas:
        by_type.setdefault(replica_type(kind, replica.role, replica.index)[0], []).append(replica)
    specs = {
        type_: _replica_spec(len(replicas), _template(plan, settings, kind, job, replicas))
        for type_, replicas in by_type.items()
    }
    if kind is MPIJOB:
        specs["Worker"] = _replica_spec(len(plan.hosts), _worker_template(plan, settings, job))
    run_policy: dict[str, Any] = {"cleanPodPolicy": "None", "backoffLimit": 0}  # pods go with the run
    labels = {RUN_LABEL: job}
    if settings.gang is not None:
        if settings.gang.scheduler == "kueue":  # Kueue admits Kubeflow jobs as a whole by this label
            labels["kueue.x-k8s.io/queue-name"] = settings.gang.queue_name or "default"
        else:  # the operator makes the PodGroup for the scheduler it was started with
            policy: dict[str, Any] = {"minAvailable": sum(spec["replicas"] for spec in specs.values())}
            if settings.gang.queue_name:
                policy["queue"] = settings.gang.queue_name
            run_policy["schedulingPolicy"] = policy
    spec: dict[str, Any] = {kind.specs_field: specs, "runPolicy": run_policy}
    if kind is PYTORCHJOB:
        spec["nprocPerNode"] = str(plan.world_size // len(plan.replicas))  # processes per node
    if kind is MPIJOB:
        spec["slotsPerWorker"] = plan.world_size // len(plan.hosts)  # the hostfile's slots
        spec["mainContainer"] = kind.container
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


def _replica_spec(replicas: int, template: dict) -> dict:
    # A replica that fails fails the job: gang semantics.
    return {"replicas": replicas, "restartPolicy": "Never", "template": template}


def _template(plan: JobPlan, settings: RunSettings, kind: KubeflowKind, job: str, replicas: list[Replica]):
    """One pod template for every replica of a type (they differ only in what the plan says)."""
    first = replicas[0]
    options = options_for(settings, first.role)
    main = main_container(plan, settings, options, first, job)
    pod_name_ref = {"name": POD_NAME_VAR, "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    main.update(
        name=kind.container,
        command=literal([settings.python, BOOTSTRAP, "run", "--replica-of-pod", *lease_arguments(settings)]),
        args=[],
        env=[pod_name_ref, *env_list(settings.launch_env, options.env_vars, settings.secret_names, job)],
    )
    main.pop("ports", None)
    if kind.port_name:
        main["ports"] = [{"name": kind.port_name, "containerPort": _port(plan, kind)}]
    with_outputs = any(r.host == outputs_host(plan) for r in replicas)
    return _pod_template(plan, settings, options, job, first.role, main, with_outputs)


def _worker_template(plan: JobPlan, settings: RunSettings, job: str) -> dict:
    """An MPIJob's workers: the source unpacked before the pod runs, then held (the operator's
    ``kubexec.sh`` starts the ranks in the main container) while the ranks' lines are printed."""
    options = options_for(settings, "node")
    main = main_container(plan, settings, options, None, job)
    rank_logs = plan.replicas[0].rank_logs
    hold = [settings.python, BOOTSTRAP, "hold", *(["--rank-logs", rank_logs] if rank_logs else [])]
    hold += lease_arguments(settings)
    main.update(command=literal(hold), args=[])
    main.pop("ports", None)
    unpack = {
        "name": "unpack",
        "image": main["image"],
        "command": literal([settings.python, BOOTSTRAP, "unpack"]),
        "workingDir": main["workingDir"],
        "env": main["env"],
        "volumeMounts": [
            mount
            for mount in main["volumeMounts"]
            if mount["name"] in ("bundle", "workdir") or mount in settings.input_mounts
        ],
        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}},
    }
    for key in ("imagePullPolicy", "securityContext"):
        if key in main:
            unpack[key] = main[key]
    # Rank 0 runs in worker 0, whose outputs are copied out; every worker shares the template.
    template = _pod_template(plan, settings, options, job, "node", main, with_outputs=True)
    spec = template["spec"]
    spec["initContainers"] = [unpack, *(spec.get("initContainers") or [])]
    return template


def _pod_template(
    plan: JobPlan,
    settings: RunSettings,
    options: PodOptions,
    job: str,
    role: str,
    main: dict,
    with_outputs: bool,
) -> dict:
    pod = {
        "metadata": {
            "labels": {**options.labels, RUN_LABEL: job, ROLE_LABEL: role},
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
