"""A Docker run's containers and network as the daemon is asked for them (pure): a container per replica
named ``<run>-<role>-<index>``, which is also its host name on the run's network, and one per node a
Horovod runner reaches over SSH; labels that find everything of a run; the bootstrap
(``common/bootstrap.py``, in the run's bundle) as its first process."""

from __future__ import annotations

from airflow_provider_dnntrain.backends.common.names import run_label
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, Replica
from airflow_provider_dnntrain.topology.gpus import GPUS_VAR
from airflow_provider_dnntrain.topology.plan import Endpoint

MANAGED_LABEL = "dnntrain.io/managed-by"
RUN_LABEL = "dnntrain.io/run"
REPLICA_LABEL = "dnntrain.io/replica"
ROOT = "/"  # where what is put into each container goes: dnntrain/bundle/ and dnntrain/secrets/
BUNDLE = "/dnntrain/bundle"
WORKDIR = "/dnntrain/run"
PENDING_FILE = "/dnntrain/secrets/pending.json"
LEASE_FILE = f"{BUNDLE}/lease"  # the watchdog's: renewed while someone watches the run
# Where the bootstrap finds the inputs to fetch and the cache it fetches them into (its literals).
INPUT_SOURCES = "/dnntrain/input-sources/inputs.json"
INPUTS_CACHE = "/dnntrain/inputs-cache"
INPUTS_CACHE_VOLUME = "dnntrain-inputs-cache"  # one per daemon: every run's containers share it
SSH_DIR, SSH_PORT = "/dnntrain/ssh", 2222  # the bootstrap's: where the run's SSH keys are, sshd's port


def member(path: str) -> str:
    """An absolute path of a container as the member of an archive put at ``ROOT``."""
    return path.lstrip("/")


def run_name(run_id: str) -> str:
    """The run's name on the daemon: its network's, and the stem of its containers' (DNS labels)."""
    return run_label(run_id)


class DockerPlacement:
    """Every replica in a container of its own, at ``<run>-<role>-<index>``, on the topology's port."""

    runs_as_root = True  # images run as root unless told otherwise

    def __init__(self, run_id: str) -> None:
        self.name = run_name(run_id)

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        return Endpoint(f"{self.name}-{role}-{index}", default_port)


def labels(run_id: str, replica: str | None = None) -> dict[str, str]:
    found = {MANAGED_LABEL: "dnntrain", RUN_LABEL: run_label(run_id, 63)}
    return {**found, REPLICA_LABEL: replica} if replica else found


def run_filter(run_id: str) -> dict:
    """What finds every container and network of a run (``filters=`` of the daemon's lists)."""
    return {"label": [f"{RUN_LABEL}={run_label(run_id, 63)}"]}


def ssh_nodes(plan: JobPlan) -> list[str]:
    """The hosts a runner on the first one reaches over SSH: Horovod's other nodes."""
    return plan.hosts[1:]


def node_name(plan: JobPlan, host: str) -> str:
    """A node's name in the run (``node-1``), as replicas' are: its host name is ``<run>-<name>``."""
    return host.removeprefix(f"{run_name(plan.run_id)}-")


def run_containers(
    plan: JobPlan, *, image: str, python: str, network: str | None, env: dict[str, str]
) -> dict[str, dict]:
    """``containers.create`` arguments of every container of the run but its watchdog, by their names
    in the run: each replica's, and each node's a runner reaches over SSH."""
    place = {"image": image, "python": python, "network": network, "env": env}
    configs = {replica.name: container_config(plan, replica, **place) for replica in plan.replicas}
    for host in ssh_nodes(plan):
        configs[node_name(plan, host)] = sshd_config(plan, host, **place)
    return configs


def container_config(
    plan: JobPlan, replica: Replica, *, image: str, python: str, network: str | None, env: dict[str, str]
) -> dict:
    """``containers.create`` arguments for ``replica``, on ``network`` (None: the host's): the bootstrap
    unpacks the bundle into the working directory, then runs the replica's argv (and prints the lines of
    the ranks it starts that write to files of their own, as ``[rank.N] line``). A runner's container
    first waits until every other node answers SSH."""
    runner = bool(plan.hosts) and replica.host == plan.hosts[0]
    peers = [arg for peer in ssh_nodes(plan) for arg in ("--ssh-peer", peer)] if runner else []
    return _container(
        f"{run_name(plan.run_id)}-{replica.name}",
        replica.host,
        network,
        image=image,
        command=[python, f"{BUNDLE}/bootstrap.py", "run", *peers, *_rank_logs(replica), "--", *replica.argv],
        labels=labels(plan.run_id, replica.name),
        environment={**env, **replica.env, "DNNTRAIN_POD_REPLICA": replica.name},
        **_devices(replica),
    )


def sshd_config(
    plan: JobPlan, host: str, *, image: str, python: str, network: str | None, env: dict[str, str]
) -> dict:
    """``containers.create`` arguments for a node the runner reaches over SSH: the bootstrap unpacks the
    bundle, then serves SSH (with the run's keys, in ``SSH_DIR``) for the ranks the runner starts
    there, printing their lines when they write to files of their own."""
    runner = plan.replicas[0]
    return _container(
        host,
        host,
        network,
        image=image,
        command=[python, f"{BUNDLE}/bootstrap.py", "sshd", "--port", str(SSH_PORT), *_rank_logs(runner)],
        labels=labels(plan.run_id, node_name(plan, host)),
        environment=dict(env),
        **_devices(runner),  # the runner's node's share of the ranks: each node's
    )


def _container(name: str, host: str, network: str | None, **fields) -> dict:
    """``fields`` and what every container of a run has: its name and place, the working directory, and
    docker-init as PID 1 (a process that is PID 1 gets no SIGTERM it does not handle: it forwards it)."""
    placed = _placed(network, name, host)
    return {**fields, "name": name, **placed, "working_dir": WORKDIR, "init": True, "detach": True}


def _rank_logs(replica: Replica) -> list[str]:
    return ["--rank-logs", replica.rank_logs] if replica.rank_logs else []


def _placed(network: str | None, name: str, host: str) -> dict:
    """On the run's network, reached by ``host`` (the container's name, or an alias of it); or on the
    host's."""
    if network is None:
        return {"network_mode": "host"}
    aliases = {"networking_config": {network: {"Aliases": [host]}}} if host != name else {}
    return {"network": network, "hostname": host, **aliases}


def input_volumes(job: TrainingJob) -> dict:
    """``volumes=`` of a replica's container: the daemon's inputs cache for downloads (fetched once per
    daemon), and each ``mode="mount"`` input's path on the Docker host, read-only where it is."""
    volumes = {}
    if any(item.downloads for item in job.inputs):
        volumes[INPUTS_CACHE_VOLUME] = {"bind": INPUTS_CACHE, "mode": "rw"}
    for item in job.inputs:
        if not item.downloads and (path := item.replica_path()):
            volumes[path] = {"bind": path, "mode": "ro"}
    return volumes


def watchdog_config(
    run_id: str, *, image: str, python: str, socket: str, timeout: float, grace: float
) -> dict:
    """The run's watchdog (``watchdog.py``): the daemon's ``socket`` mounted, no network; it removes
    the run once its lease lapses or says ``stop``."""
    return {
        "image": image,
        "command": [
            python,
            f"{BUNDLE}/watchdog.py",
            "--run",
            run_label(run_id, 63),
            "--timeout",
            f"{timeout:g}",
            "--grace",
            f"{grace:g}",
        ],  # fmt: skip
        "name": f"{run_name(run_id)}-watchdog",
        "labels": labels(run_id, "watchdog"),
        "volumes": {socket: {"bind": "/var/run/docker.sock", "mode": "rw"}},
        "network_mode": "none",
        "detach": True,
    }


def _devices(replica: Replica) -> dict:
    """``device_requests=`` for the GPUs the plan gave ``replica`` (one per process; parameter servers
    and jobs without ``use_gpu``: none), as ``docker run --gpus N``."""
    count = int(replica.env.get(GPUS_VAR, "0"))
    if not count:
        return {}
    from docker.types import DeviceRequest

    return {"device_requests": [DeviceRequest(count=count, capabilities=[["gpu"]])]}
