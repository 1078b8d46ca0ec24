"""The fake cluster's Kubeflow training operator (v1: TFJob, PyTorchJob, MPIJob), modelled on
training-operator 1.9's controllers: admission as its webhooks and the CRDs' schemas check a job; then, per
replica, a pod ``<job>-<type>-<index>`` from the type's template (its labels, restart policy and the
cluster variables: ``TF_CONFIG`` in the ``tensorflow`` container;
``MASTER_ADDR``/``MASTER_PORT``/``WORLD_SIZE``/``RANK``/``PET_*`` and ``PYTHONUNBUFFERED`` in every
container of a PyTorch pod) and a headless Service of the same name selecting it; the job's status (replica
counts, conditions Created / Running / Succeeded / Failed, with the operator's reasons and messages) kept
up to date; ``cleanPodPolicy`` applied at the end. Pods and Services are owned by the job, so deleting it
garbage-collects them. MPIJobs: fake_mpi_controller.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from fake_mpi_controller import MPIJobController, admit_mpi_job, pod_from
from fake_store import now_rfc3339

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the schema checks
from kubeflow_schema import KubeflowSchemaError, validate_kubeflow  # noqa: E402

GROUP = "apis/kubeflow.org/v1"
LABELS = "training.kubeflow.org"
KINDS = {
    "tfjobs": {"kind": "TFJob", "specs": "tfReplicaSpecs", "container": "tensorflow", "port": "tfjob-port"},
    "pytorchjobs": {
        "kind": "PyTorchJob",
        "specs": "pytorchReplicaSpecs",
        "container": "pytorch",
        "port": "pytorchjob-port",
    },
    "mpijobs": {"kind": "MPIJob", "specs": "mpiReplicaSpecs", "container": None, "port": None},
}
_TF_TYPES = ("Chief", "Evaluator", "Master", "PS", "Worker")  # the order the operator sums them in
_DEFAULT_PORTS = {"tfjobs": 2222, "pytorchjobs": 23456}


class TrainingOperator(MPIJobController):
    """Mixed into the cluster: uses its ``store``, ``create`` and ``delete``."""

    def admit_training_job(self, plural: str, job: dict) -> str | None:
        """Why the API would refuse the job (its CRD's schema, the operator's webhook), if it would."""
        try:
            validate_kubeflow(job)
        except KubeflowSchemaError as error:
            return str(error)
        if plural == "mpijobs":
            return admit_mpi_job(job)
        kind = KINDS[plural]
        for type_, spec in (job["spec"].get(kind["specs"]) or {}).items():
            containers = spec["template"]["spec"]["containers"]
            if not any(c["name"] == kind["container"] for c in containers):
                path = f"spec.{kind['specs']}[{type_}].template.spec.containers"
                return (
                    f"{path}: Required value: must have at least one container with name {kind['container']}"
                )
            if plural == "pytorchjobs" and type_ == "Master" and spec.get("replicas", 1) != 1:
                return "spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"
        return None

    def start_training_job(self, key: tuple) -> None:
        job = self.store.objects[key]
        job["status"] = {
            "conditions": [_condition(key, "Created", _said(key, "is created"))],
            "replicaStatuses": {},
        }
        self.store.put(key, job, "MODIFIED")
        asyncio.create_task(self.reconcile_training_job(key, job["metadata"]["uid"]))

    async def reconcile_training_job(self, key: tuple, uid: str) -> None:
        await asyncio.sleep(0.1)  # the operator's informer and work queue
        made = False
        while (job := self.store.objects.get(key)) is not None and job["metadata"]["uid"] == uid:
            if not made:
                self._make_replicas(key, job)
                made = True
            finished = self._update_status(key, job)
            if finished:
                self._clean_pods(key, job)
                return
            await asyncio.sleep(0.2)

    def _make_replicas(self, key: tuple, job: dict) -> None:
        _, namespace, plural, name = key
        kind = KINDS[plural]
        specs = job["spec"][kind["specs"]]
        owner = {
            "apiVersion": "kubeflow.org/v1",
            "kind": kind["kind"],
            "name": name,
            "uid": job["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }

        def labels_of(type_: str, index: int) -> dict:
            return {
                f"{LABELS}/job-name": name,
                f"{LABELS}/operator-name": f"{plural[:-1]}-controller",
                f"{LABELS}/replica-type": type_.lower(),
                f"{LABELS}/replica-index": str(index),
            }

        if plural == "mpijobs":
            self.make_mpi_job(key, job, owner, labels_of)
            return
        for type_, spec in specs.items():
            for index in range(spec.get("replicas", 1)):
                labels = labels_of(type_, index)
                if type_ in ("Chief", "Master"):
                    labels[f"{LABELS}/job-role"] = "master"
                replica = f"{name}-{type_.lower()}-{index}"
                service = self._service(replica, labels, spec, kind, owner)
                pod = self._pod(job, plural, type_, index, spec, labels, owner)
                for plural_, obj in (("services", service), ("pods", pod)):
                    response = self.create(("api/v1", namespace, plural_), obj)
                    if response.status >= 300:  # the operator would record an event and retry
                        print(f"training operator: {plural_} {replica}: {response.text}", flush=True)

    def _service(self, name: str, labels: dict, spec: dict, kind: dict, owner: dict) -> dict:
        ports = [
            {"name": p["name"], "port": p["containerPort"]}
            for c in spec["template"]["spec"]["containers"]
            if c["name"] == kind["container"]
            for p in c.get("ports") or []
            if p.get("name") == kind["port"]
        ]
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
            "spec": {"clusterIP": "None", "selector": labels, "ports": ports},
        }

    def _pod(self, job: dict, plural: str, type_: str, index: int, spec: dict, labels: dict, owner: dict):
        pod = pod_from(spec, f"{job['metadata']['name']}-{type_.lower()}-{index}", labels, owner)
        variables = (_tf_variables if plural == "tfjobs" else _pytorch_variables)(job, type_, index)
        for container in pod["spec"]["containers"]:
            if plural == "pytorchjobs" or container["name"] == KINDS[plural]["container"]:
                container["env"] = [*(container.get("env") or []), *variables]
        return pod

    def _update_status(self, key: tuple, job: dict) -> bool:
        """The job's replica counts and conditions from its pods, as the operator's UpdateJobStatus
        keeps them; True once it succeeded or failed."""
        _, namespace, plural, name = key
        kind = KINDS[plural]
        specs = job["spec"][kind["specs"]]
        pods = [
            p
            for p in self.store.listed(("api/v1", namespace, "pods"), f"{LABELS}/job-name={name}")
            if any(r.get("uid") == job["metadata"]["uid"] for r in p["metadata"].get("ownerReferences") or [])
        ]
        if plural == "mpijobs":
            counts, state, running = self.mpi_job_state(job, pods)
        else:
            counts, state, running = _job_state(key, specs, pods)
        conditions = job["status"]["conditions"]
        if running and not any(c["type"] == "Running" for c in conditions):
            conditions.append(_condition(key, "Running", _said(key, "is running")))
        if state is not None:
            for condition in conditions:
                if condition["type"] == "Running":
                    condition["status"] = "False"
            type_, reason, message = state
            conditions.append(_condition(key, type_, message, reason))
            job["status"]["completionTime"] = now_rfc3339()
        job["status"]["replicaStatuses"] = {t: {k: v for k, v in c.items() if v} for t, c in counts.items()}
        self.store.put(key, job, "MODIFIED")
        return state is not None

    def _clean_pods(self, key: tuple, job: dict) -> None:
        policy = job["spec"].get("runPolicy", {}).get("cleanPodPolicy", "None")
        if policy == "None":
            return
        selector = f"{LABELS}/job-name={key[3]}"
        for pod in self.store.listed(("api/v1", key[1], "pods"), selector):
            if policy == "All" or pod.get("status", {}).get("phase") in ("Running", "Pending"):
                asyncio.create_task(self.delete(("api/v1", key[1], "pods", pod["metadata"]["name"])))


def _job_state(key: tuple, specs: dict, pods: list[dict]) -> tuple[dict, tuple | None, bool]:
    """Replica counts, the verdict (condition type, reason, message) if there is one, whether it runs:
    the chief / master decides success (else the workers), any failed replica fails the job."""
    counts = {}
    for type_ in specs:
        mine = [p for p in pods if p["metadata"]["labels"][f"{LABELS}/replica-type"] == type_.lower()]
        phases = [p.get("status", {}).get("phase") for p in mine]
        counts[type_] = {
            "active": phases.count("Running"),
            "succeeded": phases.count("Succeeded"),
            "failed": phases.count("Failed"),
        }
    kind = KINDS[key[2]]["kind"]
    decider = next((t for t in ("Chief", "Master") if t in specs), "Worker")
    state = None
    if counts.get(decider, {}).get("succeeded"):
        state = ("Succeeded", f"{kind}Succeeded", _said(key, "successfully completed"))
    failed = [(t, c["failed"]) for t, c in counts.items() if c["failed"]]
    if failed and state is None:
        type_, number = failed[0]
        state = (
            "Failed",
            f"{kind}Failed",
            _said(key, f"has failed because {number} {type_} replica(s) failed"),
        )
    return counts, state, any(c["active"] for c in counts.values())


def _said(key: tuple, what: str) -> str:
    return f"{KINDS[key[2]]['kind']} {key[1]}/{key[3]} {what}."


def _condition(key: tuple, type_: str, message: str, reason: str | None = None) -> dict:
    return {
        "type": type_,
        "status": "True",
        "reason": reason or f"{KINDS[key[2]]['kind']}{type_}",
        "message": message,
        "lastUpdateTime": now_rfc3339(),
        "lastTransitionTime": now_rfc3339(),
    }


def _port(spec: dict, container: str, port_name: str, default: int) -> int:
    for c in spec["template"]["spec"]["containers"]:
        if c["name"] == container:
            for port in c.get("ports") or []:
                if port.get("name") == port_name:
                    return port["containerPort"]
    return default


def _tf_variables(job: dict, type_: str, index: int) -> list[dict]:
    specs = job["spec"]["tfReplicaSpecs"]
    namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
    if sum(specs[t].get("replicas", 1) for t in _TF_TYPES if t in specs) == 1:
        return []  # a job of one replica is not distributed: no TF_CONFIG
    cluster = {}
    for t, spec in specs.items():
        port = _port(spec, "tensorflow", "tfjob-port", _DEFAULT_PORTS["tfjobs"])
        hosts = [f"{name}-{t.lower()}-{i}.{namespace}.svc:{port}" for i in range(spec.get("replicas", 1))]
        cluster[t.lower()] = hosts
    config = {"cluster": cluster, "task": {"type": type_.lower(), "index": index}, "environment": "cloud"}
    return [{"name": "TF_CONFIG", "value": json.dumps(config, separators=(",", ":"))}]


def _pytorch_variables(job: dict, type_: str, index: int) -> list[dict]:
    spec = job["spec"]
    specs = spec["pytorchReplicaSpecs"]
    total = sum(s.get("replicas", 1) for s in specs.values())
    nproc = spec.get("nprocPerNode")
    world = total * (int(nproc) if nproc and nproc.isdigit() else 1)
    variables = {"PYTHONUNBUFFERED": "1"}
    if "Master" in specs:
        port = _port(specs["Master"], "pytorch", "pytorchjob-port", _DEFAULT_PORTS["pytorchjobs"])
        master = f"{job['metadata']['name']}-master-0"
        rank = index + 1 if type_ == "Worker" else index
        variables.update(MASTER_PORT=str(port), PET_MASTER_PORT=str(port))
        variables.update(MASTER_ADDR=master, PET_MASTER_ADDR=master)
        variables.update(WORLD_SIZE=str(world), RANK=str(rank), PET_NODE_RANK=str(rank))
    if nproc:
        variables["PET_NPROC_PER_NODE"] = nproc
    variables["PET_NNODES"] = str(total)
    return [{"name": k, "value": v} for k, v in variables.items()]
