"""A job plan as Kubernetes objects: pure, no API calls.

One run is: a ConfigMap that owns everything else (the plan, the source snapshot and the pods' bootstrap:
deleting it garbage-collects the run), a Secret (the job's secrets, and SSH keys for runners that reach
other pods), a headless Service, one pod per host of the plan, and a PodGroup when a gang scheduler
asks for one. Pod ``<job>-<role>-<i>`` has hostname ``<job>-<role>-<i>`` and subdomain ``<job>``, so
``<job>-<role>-<i>.<job>`` - the host the topology was rendered with - resolves in the namespace.
A host of the plan that runs no replica (Horovod's other nodes) runs an SSH daemon.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_dnntrain.backends.common.names import run_label
from airflow_provider_dnntrain.backends.common.replica import LAUNCH_ID_VAR
from airflow_provider_dnntrain.backends.kubernetes.gang import Gang, join_gang, pod_group
from airflow_provider_dnntrain.backends.kubernetes.options import PodOptions, merge_pod_template
from airflow_provider_dnntrain.backends.kubernetes.secrets import (
    PULL_KEY,
    PULL_SECRET_TYPE,
    pull_secret_name,
    secret_key,
    secret_object,
)
from airflow_provider_dnntrain.topology import JobPlan, Replica
from airflow_provider_dnntrain.topology.gpus import GPUS_VAR

API_GROUP = "dnntrain"  # label prefix
RUN_LABEL = f"{API_GROUP}/run"
REPLICA_LABEL = f"{API_GROUP}/replica"
ROLE_LABEL = f"{API_GROUP}/role"
# On the run's owner: how far each pod's log was logged, left by a watcher that was stopped.
CURSORS_ANNOTATION = f"{API_GROUP}/log-cursors"
LEASE_KEY = "lease"  # the run's ConfigMap's: renewed by whoever watches the run, read by its pods
LAUNCH_ANNOTATION = f"{API_GROUP}/launch"  # which launch made the owner: a create retried is not a clash
MAIN_CONTAINER = "base"  # KubernetesPodOperator's name, so pod templates written for it apply
OUTPUTS_CONTAINER = "outputs"
BUNDLE_MOUNT = "/dnntrain/bundle"
WORKDIR = "/dnntrain/run"
SSH_MOUNT = "/dnntrain/ssh"
BOOTSTRAP = f"{BUNDLE_MOUNT}/bootstrap.py"
SSH_PORT = 2222
POD_REPLICA_VAR = "DNNTRAIN_POD_REPLICA"  # which of the bundle's files.json entries is the pod's
SSH_FILES = ("id", "authorized_keys", "host_key", "known_hosts")
GPU_RESOURCE = "nvidia.com/gpu"
# A ConfigMap holds at most 1 MiB (as stored: base64); some room is left for the plan.
MAX_BUNDLE_BYTES = 720 * 1024
_JOB_NAME_LENGTH = 45  # room for "-<role>-<index>" in a 63-character host name


def job_name(run_id: str) -> str:
    """The run's name for its objects: a DNS-1035 label (a Service's name starts with a letter), short
    enough that ``<name>-evaluator-<index>`` is a host name; the run id's hash suffix keeps it unique."""
    return run_label(run_id, _JOB_NAME_LENGTH)


@dataclass(frozen=True)
class RunObjects:
    """Everything one run creates, in creation order after the owner."""

    owner: dict
    owner_reference: dict  # what every other object carries
    secret: dict
    service: dict | None
    pods: list[dict]
    pod_group: dict | None = None
    extra: list[dict] = field(default_factory=list)  # a Kubeflow job, instead of service and pods
    pull_secret: dict | None = None

    def all(self) -> list[dict]:
        optional = [obj for obj in (self.pull_secret, self.service, self.pod_group) if obj]
        return [self.owner, self.secret, *optional, *self.extra, *self.pods]


@dataclass(frozen=True)
class RunSettings:
    namespace: str
    image: str
    python: str
    options: PodOptions
    role_options: Mapping[str, PodOptions]
    launch_env: Mapping[str, str]  # every replica's, besides its plan's (tracking, launch id...)
    secret_names: list[str]  # variables that come from the run's Secret
    use_gpu: bool = False
    cpu: float | None = None
    memory: str | None = None
    grace_seconds: int = 10
    gang: Gang | None = None
    pod_template: dict | None = None  # pod_template_file / full_pod_spec, as the API's JSON
    input_volumes: list[dict] = field(default_factory=list)  # inputs.input_volumes
    input_mounts: list[dict] = field(default_factory=list)  # in every container running the bootstrap
    orphan_timeout: float | None = None  # pods end themselves once nobody renewed the lease this long
    active_deadline: int | None = None  # seconds: kubelet ends the pods once they have run this long
    pull_secret: bool = False  # the run has an image pull Secret of its own (<job>-pull)


def render_run(
    plan: JobPlan,
    settings: RunSettings,
    bundle: Mapping[str, bytes],
    secret_values: Mapping[str, str],
    owner_uid: str = "",
    pull_config: str = "",
) -> RunObjects:
    """Every object of the run. ``owner_uid``: the owner ConfigMap's, once it exists (ownerReferences
    need it); ``secret_values``: what the Secret holds (masked values for a preview); ``pull_config``:
    the ``.dockerconfigjson`` of the run's pull Secret, when ``settings.pull_secret``."""
    job = job_name(plan.run_id)
    labels = {RUN_LABEL: job}
    owner = _owner(plan, job, settings.namespace, labels, bundle)
    owner["metadata"]["annotations"] = {LAUNCH_ANNOTATION: settings.launch_env.get(LAUNCH_ID_VAR, "")}
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": job,
        "uid": owner_uid,
        "controller": True,
    }
    children_meta = {"namespace": settings.namespace, "labels": labels, "ownerReferences": [reference]}
    secret = secret_object(job, children_meta, "Opaque", secret_values)
    pull_secret = None
    if settings.pull_secret:
        pull_secret = secret_object(
            pull_secret_name(job), children_meta, PULL_SECRET_TYPE, {PULL_KEY: pull_config}
        )
    pods = [_pod(plan, settings, job, children_meta, host, replica) for host, replica in pod_hosts(plan)]
    if settings.gang is not None:
        pods = [join_gang(pod, settings.gang, job, len(pods)) for pod in pods]
    return RunObjects(
        owner=owner,
        owner_reference=reference,
        secret=secret,
        service=_service(plan, job, children_meta),
        pods=pods,
        pod_group=pod_group(settings.gang, job, children_meta, len(pods)) if settings.gang else None,
        pull_secret=pull_secret,
    )


def pod_hosts(plan: JobPlan) -> list[tuple[str, Replica | None]]:
    """Each pod's host, with the replica it runs (``None``: a node a runner reaches over SSH)."""
    on_host = {r.host: r for r in plan.replicas}
    hosts = [r.host for r in plan.replicas] + [h for h in plan.hosts if h not in on_host]
    return [(host, on_host.get(host)) for host in hosts]


def pod_name(host: str) -> str:
    return host.split(".", 1)[0]


def ssh_nodes(plan: JobPlan) -> list[str]:
    """The nodes a runner on the first node reaches over SSH (none when the runner has a pod of its
    own: an MPIJob's launcher starts ranks through the training operator's ``kubectl exec``)."""
    if plan.hosts and plan.replicas[0].host == plan.hosts[0]:
        return plan.hosts[1:]
    return []


def outputs_host(plan: JobPlan) -> str:
    """Where the chief's ``./outputs`` are written: the first node for Horovod (rank 0 runs there)."""
    return plan.hosts[0] if plan.hosts else plan.chief.host


def _owner(plan: JobPlan, job: str, namespace: str, labels: dict, bundle: Mapping[str, bytes]) -> dict:
    size = sum(len(data) for data in bundle.values())
    if size > MAX_BUNDLE_BYTES:
        raise ValueError(
            f"source_directory: the snapshot and support files take {size // 1024} KiB, more than a "
            f"ConfigMap holds ({MAX_BUNDLE_BYTES // 1024} KiB); bake large files into the image or read "
            "them as inputs"
        )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": job, "namespace": namespace, "labels": labels},
        "data": {"plan.json": plan.to_json(), LEASE_KEY: "0"},
        "binaryData": {name: base64.b64encode(data).decode() for name, data in sorted(bundle.items())},
    }


def _service(plan: JobPlan, job: str, meta: dict) -> dict:
    ports = sorted({r.port for r in plan.replicas if r.port})
    spec: dict[str, Any] = {
        "clusterIP": "None",
        "selector": {RUN_LABEL: job},
        # Peers must resolve each other while starting, before any of them could be "ready".
        "publishNotReadyAddresses": True,
    }
    if ports:
        spec["ports"] = [{"name": f"p{port}", "port": port, "targetPort": port} for port in ports]
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": job, **meta}, "spec": spec}


def _pod(
    plan: JobPlan, settings: RunSettings, job: str, meta: dict, host: str, replica: Replica | None
) -> dict:
    name = pod_name(host)
    role = replica.role if replica else "node"
    options = options_for(settings, role)
    labels = {**options.labels, **meta["labels"], ROLE_LABEL: role, REPLICA_LABEL: name[len(job) + 1 :]}
    main = main_container(plan, settings, options, replica, job)
    spec = {
        "hostname": name,
        "subdomain": job,
        "restartPolicy": "Never",
        **pod_spec(plan, settings, options, job, main, with_outputs=host == outputs_host(plan)),
    }
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": meta["namespace"],
            "labels": labels,
            "annotations": dict(options.annotations),
            "ownerReferences": meta["ownerReferences"],
        },
        "spec": spec,
    }
    return merge_pod_template(settings.pod_template, pod) if settings.pod_template else pod


def options_for(settings: RunSettings, role: str) -> PodOptions:
    """The job's pod options, with the role's own where it has them."""
    if role in settings.role_options:
        return settings.role_options[role].over(settings.options)
    return settings.options


def pod_spec(
    plan: JobPlan, settings: RunSettings, options: PodOptions, job: str, main: dict, with_outputs: bool
) -> dict:
    """A pod's spec around its main container (and the outputs sidecar when it is the chief's)."""
    containers = [main, _outputs_container(settings, main)] if with_outputs else [main]
    spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.grace_seconds,
        **({"activeDeadlineSeconds": settings.active_deadline} if settings.active_deadline else {}),
        "containers": containers,
        "volumes": [
            {"name": "bundle", "configMap": {"name": job}},
            {"name": "workdir", "emptyDir": {}},
            *_ssh_volume(plan, job),
            *settings.input_volumes,
            *options.volumes,
        ],
    }
    optional = {
        "nodeSelector": options.node_selector or None,
        "affinity": options.affinity,
        "tolerations": options.tolerations or None,
        "serviceAccountName": options.service_account_name,
        "imagePullSecrets": [{"name": n} for n in _pull_secrets(settings, options, job)] or None,
        "securityContext": options.security_context,
        "priorityClassName": options.priority_class_name,
        "schedulerName": options.schedulername,
        "initContainers": options.init_containers or None,
    }
    spec.update({k: v for k, v in optional.items() if v is not None})
    return spec


def _pull_secrets(settings: RunSettings, options: PodOptions, job: str) -> list[str]:
    return [*options.image_pull_secrets, *([pull_secret_name(job)] if settings.pull_secret else [])]


def main_container(
    plan: JobPlan, settings: RunSettings, options: PodOptions, replica: Replica | None, job: str
) -> dict:
    rank_logs = plan.replicas[0].rank_logs if plan.hosts else None
    if replica is None:
        command = [settings.python, BOOTSTRAP, "sshd", "--port", str(SSH_PORT)]
        env = {**settings.launch_env}
    else:
        command = [settings.python, BOOTSTRAP, "run"]
        if plan.hosts and replica.host == plan.hosts[0]:
            command += [arg for peer in ssh_nodes(plan) for arg in ("--ssh-peer", peer)]
        env = {**replica.env, **settings.launch_env, POD_REPLICA_VAR: replica.name}
    if rank_logs:
        command += ["--rank-logs", rank_logs]
    command += lease_arguments(settings)
    container: dict[str, Any] = {
        "name": MAIN_CONTAINER,
        "image": options.image or settings.image,
        "command": literal(command),
        "args": literal(["--", *replica.argv]) if replica else [],
        "workingDir": WORKDIR,
        "env": env_list(env, options.env_vars, settings.secret_names, job),
        "resources": _resources(plan, settings, options, replica),
        "volumeMounts": [
            {"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True},
            {"name": "workdir", "mountPath": WORKDIR},
            *([{"name": "ssh", "mountPath": SSH_MOUNT, "readOnly": True}] if ssh_nodes(plan) else []),
            *settings.input_mounts,
            *options.volume_mounts,
        ],
    }
    if replica is None:
        container["ports"] = [{"name": "ssh", "containerPort": SSH_PORT}]
    elif replica.port:
        container["ports"] = [{"name": "replica", "containerPort": replica.port}]
    if options.image_pull_policy:
        container["imagePullPolicy"] = options.image_pull_policy
    if options.container_security_context:
        container["securityContext"] = options.container_security_context
    return container


def _outputs_container(settings: RunSettings, main: dict) -> dict:
    """Keeps the chief's working directory readable once its script has ended: the outputs are copied
    out of it through ``exec``, as KubernetesPodOperator's XCom sidecar does."""
    container = {
        "name": OUTPUTS_CONTAINER,
        "image": main["image"],
        "command": literal([settings.python, BOOTSTRAP, "hold", *lease_arguments(settings)]),
        "workingDir": WORKDIR,
        # It sleeps, then streams the outputs a block at a time (bootstrap.py ``pack``): an interpreter's
        # memory, whatever the outputs weigh. A limit of its own, so a LimitRange's default is not it.
        "resources": {"requests": {"cpu": "10m", "memory": "64Mi"}, "limits": {"memory": "128Mi"}},
        "volumeMounts": [
            {"name": "bundle", "mountPath": BUNDLE_MOUNT, "readOnly": True},
            {"name": "workdir", "mountPath": WORKDIR},
        ],
    }
    for key in ("imagePullPolicy", "securityContext"):
        if key in main:
            container[key] = main[key]
    return container


def lease_arguments(settings: RunSettings) -> list[str]:
    """The bootstrap's: end the pod's processes once the run's lease was not renewed for so long."""
    return ["--orphan-timeout", f"{settings.orphan_timeout:g}"] if settings.orphan_timeout else []


def literal(value):
    """A string (or strings) Kubernetes passes on as written: it expands ``$(VAR)`` in commands,
    arguments and variables' values, and ``$$`` is its escape for ``$``."""
    if isinstance(value, list):
        return [literal(item) for item in value]
    return value.replace("$", "$$")


def _ssh_volume(plan: JobPlan, job: str) -> list[dict]:
    """The run's SSH key, host key and known hosts, for a runner reaching its other nodes' pods."""
    if not ssh_nodes(plan):
        return []
    items = [{"key": f"ssh.{name}", "path": name} for name in SSH_FILES]
    return [{"name": "ssh", "secret": {"secretName": job, "defaultMode": 0o400, "items": items}}]


def env_list(values: Mapping[str, str], extra: Mapping[str, str], secrets: list[str], job: str) -> list[dict]:
    plain = {**values, **extra}
    env = [{"name": k, "value": literal(str(v))} for k, v in plain.items() if k not in secrets]
    refs = [{"name": n, "valueFrom": {"secretKeyRef": {"name": job, "key": secret_key(n)}}} for n in secrets]
    return env + refs


def _gpus_of(plan: JobPlan, replica: Replica | None) -> int:
    """The devices a pod's processes use: a runner's nodes their share of the ranks (a runner in a pod
    apart from them: none), any other replica the plan's (parameter servers: none)."""
    if plan.hosts or replica is None:
        return _processes_on(plan, replica)
    return int(replica.env.get(GPUS_VAR, "1"))


def _processes_on(plan: JobPlan, replica: Replica | None) -> int:
    """How many of the job's processes a pod runs (none: a runner in a pod apart from the nodes)."""
    if plan.hosts:  # a runner's nodes each run an equal share of the ranks
        if replica is not None and replica.host not in plan.hosts:
            return 0
        return max(1, plan.world_size // len(plan.hosts))
    return max(1, len(replica.ranks)) if replica else 1


def _resources(plan: JobPlan, settings: RunSettings, options: PodOptions, replica: Replica | None) -> dict:
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if settings.cpu:
        requests["cpu"] = f"{settings.cpu:g}"
    if settings.memory:
        requests["memory"] = limits["memory"] = settings.memory
    if settings.use_gpu and (gpus := _gpus_of(plan, replica)):
        limits[GPU_RESOURCE] = str(gpus)
    given = options.container_resources or {}
    requests.update(given.get("requests") or {})
    limits.update(given.get("limits") or {})
    return {k: v for k, v in {"requests": requests, "limits": limits}.items() if v}
