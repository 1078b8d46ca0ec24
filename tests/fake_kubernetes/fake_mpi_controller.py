"""The fake training operator's MPIJob (``kubeflow.org/v1``) controller, modelled on training-operator
1.9's ``pkg/controller.v1/mpi``: the webhook's rules (a Launcher of one replica, Launcher / Worker types,
every container named and with an image); then a ConfigMap ``<job>-config`` (``hostfile`` of the worker
pods with ``slotsPerWorker`` slots, ``kubexec.sh``, ``discover_hosts.sh``), the launcher's
ServiceAccount, Role and RoleBinding, the worker pods ``<job>-worker-<i>`` (``kubexec.sh`` mounted at
/etc/mpi in their first container) and the launcher pod ``<job>-launcher`` (its ``kubectl-delivery`` init
container, ``OMPI_MCA_plm_rsh_agent`` / ``OMPI_MCA_orte_default_hostfile`` in its first container). The
status follows the launcher: it succeeds or fails the job; an evicted worker fails it too.
"""

from __future__ import annotations

import json

CONFIG_MOUNT = "/etc/mpi"
KUBECTL_MOUNT = "/opt/kube"
DELIVERY_IMAGE = "kubeflow/kubectl-delivery:latest"  # the operator's default --mpi-kubectl-delivery-image
_CONFIG_VOLUME = "mpi-job-config"
_KUBECTL_VOLUME = "mpi-job-kubectl"


def admit_mpi_job(job: dict) -> str | None:
    """Why the operator's webhook (ValidateV1MpiJobSpec) refuses an MPIJob, if it does."""
    specs = job["spec"].get("mpiReplicaSpecs") or {}
    for type_, spec in specs.items():
        containers = (spec or {}).get("template", {}).get("spec", {}).get("containers") or []
        if not containers:
            return f"MPIReplicaSpecs is not valid: containers definition expected in {type_}"
        if type_ not in ("Launcher", "Worker"):
            return f"MPIReplicaType is {type_} but must be one of [Launcher Worker]"
        if any(not c.get("image") for c in containers):
            return f"MPIReplicaSpec is not valid: Image is undefined in the container of {type_}"
        if type_ == "Launcher" and spec.get("replicas", 1) != 1:
            return "MPIReplicaSpec is not valid: There must be only 1 launcher replica"
    if "Launcher" not in specs:
        return "MPIReplicaSpec is not valid: Master ReplicaSpec must be present"
    return None


class MPIJobController:
    """Mixed into the training operator: uses the cluster's ``store`` and ``create``."""

    def make_mpi_job(self, key: tuple, job: dict, owner: dict, labels_of) -> None:
        _, namespace, _, name = key
        spec = job["spec"]
        workers = spec["mpiReplicaSpecs"].get("Worker", {}).get("replicas", 0)
        slots = spec.get("slotsPerWorker", 1)
        hostfile = "".join(f"{name}-worker-{i} slots={slots}\n" for i in range(workers))
        kubexec = f"#!/bin/sh\nset -x\nPOD_NAME=$1\nshift\n{KUBECTL_MOUNT}/kubectl exec ${{POD_NAME}}"
        if spec.get("mainContainer"):
            kubexec += f" --container {spec['mainContainer']}"
        kubexec += ' -- /bin/sh -c "$*"'
        meta = {"labels": {"app": name}, "ownerReferences": [owner]}
        launcher_name = f"{name}-launcher"
        rules = [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
        rules.append({"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create"]})
        objects = [
            ("api/v1", "configmaps", {
                "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"{name}-config", **meta},
                "data": {"hostfile": hostfile, "kubexec.sh": kubexec, "discover_hosts.sh": "#!/bin/sh"},
            }),
            ("api/v1", "serviceaccounts", {
                "apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": launcher_name, **meta},
            }),
            ("apis/rbac.authorization.k8s.io/v1", "roles", {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                "metadata": {"name": launcher_name, **meta}, "rules": rules,
            }),
            ("apis/rbac.authorization.k8s.io/v1", "rolebindings", {
                "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                "metadata": {"name": launcher_name, **meta},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": launcher_name},
                "subjects": [{"kind": "ServiceAccount", "name": launcher_name, "namespace": namespace}],
            }),
        ]  # fmt: skip
        for index in range(workers):
            objects.append(
                ("api/v1", "pods", self._mpi_worker(job, index, labels_of("Worker", index), owner))
            )
        objects.append(("api/v1", "pods", self._mpi_launcher(job, labels_of("Launcher", 0), owner)))
        for prefix, plural, obj in objects:
            response = self.create((prefix, namespace, plural), obj)
            if response.status >= 300:  # the operator would record an event and retry
                print(f"training operator: {plural} {obj['metadata']['name']}: {response.text}", flush=True)

    def _mpi_worker(self, job: dict, index: int, labels: dict, owner: dict) -> dict:
        spec = job["spec"]["mpiReplicaSpecs"]["Worker"]
        pod = pod_from(spec, f"{job['metadata']['name']}-worker-{index}", labels, owner)
        first = pod["spec"]["containers"][0]
        if not first.get("command"):
            first.update(command=["sleep"], args=["365d"])
        first["volumeMounts"] = [*(first.get("volumeMounts") or []), _config_mount()]
        items = [{"key": "kubexec.sh", "path": "kubexec.sh", "mode": 0o555}]
        pod["spec"]["volumes"] = [*(pod["spec"].get("volumes") or []), _config_volume(job, items)]
        return pod

    def _mpi_launcher(self, job: dict, labels: dict, owner: dict) -> dict:
        name = job["metadata"]["name"]
        labels = {**labels, "training.kubeflow.org/job-role": "master"}
        pod = pod_from(job["spec"]["mpiReplicaSpecs"]["Launcher"], f"{name}-launcher", labels, owner)
        spec = pod["spec"]
        spec.setdefault("serviceAccountName", f"{name}-launcher")
        kubectl_mount = {"name": _KUBECTL_VOLUME, "mountPath": KUBECTL_MOUNT}
        resources = {"cpu": "100m", "memory": "512Mi", "ephemeral-storage": "5Gi"}
        delivery = {
            "name": "kubectl-delivery",
            "image": DELIVERY_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "env": [
                {"name": "TARGET_DIR", "value": KUBECTL_MOUNT},
                {"name": "NAMESPACE", "value": job["metadata"]["namespace"]},
            ],
            "volumeMounts": [kubectl_mount, _config_mount()],
            "resources": {"limits": resources, "requests": resources},
        }
        spec["initContainers"] = [*(spec.get("initContainers") or []), delivery]
        first = spec["containers"][0]
        first["env"] = [
            *(first.get("env") or []),
            {"name": "OMPI_MCA_plm_rsh_agent", "value": f"{CONFIG_MOUNT}/kubexec.sh"},
            {"name": "OMPI_MCA_orte_default_hostfile", "value": f"{CONFIG_MOUNT}/hostfile"},
            {"name": "NVIDIA_VISIBLE_DEVICES", "value": ""},
            {"name": "NVIDIA_DRIVER_CAPABILITIES", "value": ""},
            {"name": "I_MPI_HYDRA_BOOTSTRAP", "value": "rsh"},
            {"name": "I_MPI_HYDRA_BOOTSTRAP_EXEC", "value": f"{CONFIG_MOUNT}/kubexec.sh"},
        ]
        first["volumeMounts"] = [*(first.get("volumeMounts") or []), kubectl_mount, _config_mount()]
        items = [
            {"key": "kubexec.sh", "path": "kubexec.sh", "mode": 0o555},
            {"key": "hostfile", "path": "hostfile", "mode": 0o444},
            {"key": "discover_hosts.sh", "path": "discover_hosts.sh", "mode": 0o555},
        ]
        spec["volumes"] = [
            *(spec.get("volumes") or []),
            {"name": _KUBECTL_VOLUME, "emptyDir": {}},
            _config_volume(job, items),
        ]
        return pod

    def mpi_job_state(self, job: dict, pods: list[dict]) -> tuple[dict, tuple | None, bool]:
        """Replica counts, the verdict (condition type, reason, message) if there is one, whether it runs,
        as the operator's updateMPIJobStatus has them: the launcher's phase decides."""
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        launcher = next((p for p in pods if p["metadata"]["name"] == f"{name}-launcher"), None)
        workers = [p for p in pods if p is not launcher]
        phase = (launcher or {}).get("status", {}).get("phase")
        worker_phases = [p.get("status", {}).get("phase") for p in workers]
        counts = {"Launcher": _counts([phase]), "Worker": _counts(worker_phases)}
        evicted = [p for p in workers if p.get("status", {}).get("reason") == "Evicted"]
        verdict = None
        if phase == "Succeeded":
            verdict = ("Succeeded", "MPIJobSucceeded", f"MPIJob {namespace}/{name} successfully completed.")
        elif phase == "Failed":
            reason = launcher["status"].get("reason") or "MPIJobFailed"
            verdict = ("Failed", reason, f"MPIJob {namespace}/{name} has failed")
        elif evicted:
            verdict = ("Failed", "MPIJobEvicted", f"{len(evicted)}/{len(workers)} workers are evicted")
        running = phase == "Running" and worker_phases.count("Running") == len(workers)
        return counts, verdict, running


def _counts(phases: list) -> dict:
    return {
        "active": phases.count("Running"),
        "succeeded": phases.count("Succeeded"),
        "failed": phases.count("Failed"),
    }


def pod_from(spec: dict, name: str, labels: dict, owner: dict) -> dict:
    """A replica's pod from its replica spec's template, as the operator makes it (any kind of job)."""
    template = json.loads(json.dumps(spec["template"]))
    meta = template.get("metadata") or {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "labels": {**(meta.get("labels") or {}), **labels},
            "annotations": meta.get("annotations") or {},
            "ownerReferences": [owner],
        },
        "spec": {**template["spec"], "restartPolicy": spec.get("restartPolicy", "Never")},
    }


def _config_mount() -> dict:
    return {"name": _CONFIG_VOLUME, "mountPath": CONFIG_MOUNT}


def _config_volume(job: dict, items: list[dict]) -> dict:
    return {
        "name": _CONFIG_VOLUME,
        "configMap": {"name": f"{job['metadata']['name']}-config", "items": items},
    }
