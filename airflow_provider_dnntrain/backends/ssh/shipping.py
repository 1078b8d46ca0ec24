"""Getting an SSH run onto its hosts: the source bundle and the support files (agent, reaper, replica
site), the GPU check, inputs put in each host's cache, the job's environment built on each host, and
what each host's agent is told to start."""

from __future__ import annotations

import json
import logging
import posixpath
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path

from airflow_provider_dnntrain.backends.common import environments, host_cache
from airflow_provider_dnntrain.backends.common.environments import EnvironmentBuildFailed, requirements_of
from airflow_provider_dnntrain.backends.common.gpus import LIST_GPUS, check_host_gpus, listed_gpus
from airflow_provider_dnntrain.backends.common.replica import (
    ENVIRONMENT_RECORD,
    REAPER,
    REPLICA_SITE,
    REPLICA_SITE_MODULES,
)
from airflow_provider_dnntrain.backends.ssh import agent
from airflow_provider_dnntrain.backends.ssh.job import COMMAND_TIMEOUT_SECONDS, SSHJobHandle, run_agent
from airflow_provider_dnntrain.backends.ssh.remote import (
    RemoteCommandFailed,
    RemoteHost,
    on_each,
    raise_first,
)
from airflow_provider_dnntrain.inputs import ResolvedInput
from airflow_provider_dnntrain.source import snapshot as copy_snapshot
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, Replica

log = logging.getLogger(__name__)
INPUT_UNPACK_SECONDS = 1800
AGENT = Path(agent.__file__)
# On each host, what the job folder's dnntrain/ holds, by local file (the remote names stay as they
# were, so that a job started by an earlier version of this provider can still be taken over).
SUPPORT_FILES = [
    (AGENT, "ssh_agent.py"),
    (REAPER, "reaper.py"),
    (Path(host_cache.__file__), "host_cache.py"),
    *((REPLICA_SITE / name, f"replica_site/{name}") for name in REPLICA_SITE_MODULES),
]


def bundle(source: Path, target: Path, resume: str | None = None) -> Path:
    """The source snapshot (and an earlier run's outputs to resume from) as one tar, uploaded once per
    host."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        snapshot = Path(scratch) / "source"
        copy_snapshot(source, snapshot, resume)
        with tarfile.open(target, "w") as tar:
            tar.add(snapshot, arcname="source")
    return target


def prepare_host(host: RemoteHost, python: str, folder: str, bundle: Path, ports: Mapping) -> dict:
    """Ship the agent, the reaper, the replica site and the source; the agent ends what a previous
    launch of the same run id left on the host, and answers with free ports."""
    support = posixpath.join(folder, "dnntrain")
    host.makedirs(posixpath.join(support, "replica_site"))
    host.makedirs(posixpath.join(folder, "hosts", host.label))
    for local, remote in SUPPORT_FILES:
        host.put_file(local, posixpath.join(support, remote))
    host.put_file(bundle, posixpath.join(folder, "hosts", host.label, "bundle.tar"))
    return run_agent(host, python, folder, "prepare", str(ports.get(host.spec.peer_address, 0)))


def check_gpus(plan: JobPlan, hosts: list[RemoteHost]) -> None:
    """``ValueError`` naming ``use_gpu`` when a host has fewer GPUs than its replicas take (the hosts'
    connections are closed then: nothing was shipped)."""
    try:
        for host in hosts:
            check_host_gpus(plan, host.spec.peer_address, f"host {host.spec}", _remote_gpus(host))
    except ValueError:
        for host in hosts:
            host.close()
        raise


def _remote_gpus(host: RemoteHost) -> tuple[int, str]:
    """The host's GPUs as ``nvidia-smi -L`` lists them there, and when there are none, why."""
    try:
        return listed_gpus(host.run(LIST_GPUS, COMMAND_TIMEOUT_SECONDS)), "nvidia-smi -L lists no GPU"
    except RemoteCommandFailed as error:  # not installed (exit 127), or no driver
        return 0, str(error)


def cache_root(host: RemoteHost, remote_root: str, name: str) -> str:
    """A cache every run on the host shares (``inputs``, ``environments``), beside its run folders."""
    return host.absolute(posixpath.join(posixpath.dirname(remote_root.rstrip("/")), name))


def ship_inputs(
    fetched: Mapping[str, tuple[ResolvedInput, Path]],
    hosts: list[RemoteHost],
    folder: str,
    scratch: Path,
    python: str,
    remote_root: str,
) -> None:
    """Every input the job downloads (``fetched`` into this worker's cache) put in each host's cache
    unless it is there already; ``<run folder>/inputs/<name>`` points at it, the same path on every host.
    One tar per input, made in ``scratch`` by whichever host needs it first."""
    if not fetched:
        return
    tars: dict[str, Path] = {}
    making = threading.Lock()

    def tar_of(key: str, entry: Path) -> Path:
        with making:
            if key not in tars:
                tars[key] = _tar_folder(entry, scratch / f"input-{key}.tar")
            return tars[key]

    def ship(host: RemoteHost) -> None:
        tool = [host.spec.python or python, "-I", "-S", posixpath.join(folder, "dnntrain", "host_cache.py")]
        root = cache_root(host, remote_root, "inputs")
        keys = [resolved.key for resolved, _ in fetched.values()]
        missing = json.loads(host.run([*tool, "missing", root, *keys], COMMAND_TIMEOUT_SECONDS))
        links = []
        for name, (resolved, entry) in fetched.items():
            if resolved.key in missing:
                began = time.monotonic()
                host.makedirs(root)
                upload = posixpath.join(root, f"{resolved.key}.{uuid.uuid4().hex[:8]}.tar")
                host.put_file(tar_of(resolved.key, entry), upload)
                host.run([*tool, "unpack", root, resolved.key, upload], INPUT_UNPACK_SECONDS)
                log.info("Input %s: put on host %s in %.2f s", name, host.spec, time.monotonic() - began)
            else:
                log.info("Input %s: cached on host %s", name, host.spec)
            links += [posixpath.join(root, resolved.key), posixpath.join(folder, "inputs", name)]
        host.run([*tool, "link", *links], COMMAND_TIMEOUT_SECONDS)

    try:
        raise_first(on_each(hosts, ship))
    finally:
        for tar in tars.values():
            tar.unlink(missing_ok=True)


def _tar_folder(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return target


def build_environment(
    host: RemoteHost, job: TrainingJob, folder: str, python: str, remote_root: str, uv_settings: dict
) -> str:
    """Build (or find) the job's environment on ``host`` with its interpreter (its connection's, else
    ``python``); its resolved packages go with the chief's logs (``logs/environment.txt``). The
    environment's interpreter."""
    base = host.spec.python or python
    script = posixpath.join(folder, "dnntrain", "environments.py")
    host.put_file(Path(environments.__file__), script)
    spec = {
        "python": base,
        "packages": job.environment.pip_packages,
        "requirements": requirements_of(job),
        "uv_settings": uv_settings,
    }
    root = cache_root(host, remote_root, "environments")
    build = [base, "-I", "-S", script, root, json.dumps(spec)]
    answer = host.run_json(build, environments.BUILD_TIMEOUT_SECONDS)
    if "error" in answer:
        raise EnvironmentBuildFailed(f"host {host.spec}: {answer['error']}")
    logs = posixpath.join(folder, "hosts", host.label, "source", "logs")
    host.makedirs(logs)
    host.put(answer["freeze"].encode(), posixpath.join(logs, ENVIRONMENT_RECORD), mode=0o644)
    how = "built" if answer["built"] else "cached"
    log.info("Environment %s on host %s (%s)", answer["key"], host.spec, how)
    return answer["python"]


def replicas_on(plan: JobPlan, host: RemoteHost) -> list[str]:
    return [r.name for r in plan.replicas if r.host == host.spec.peer_address]


def start_on_host(handle: SSHJobHandle, host: RemoteHost, env: Mapping[str, str], lease: Mapping) -> None:
    """Have the host's agent start its replicas (``env`` on top of each one's own), detached, under
    reapers that stop them as ``lease`` says (``grace``, ``lease_timeout``)."""
    names = handle.replicas_on[host.label]
    spec = {
        "launch_id": handle.launch_id,
        **lease,
        "replicas": [_replica_spec(handle.plan.replica(n), env) for n in names],
        "mirrors": [_replica_spec(r, {}) for r in _mirrored_on(handle.plan, host)],
    }
    host.put(json.dumps(spec).encode(), posixpath.join(handle.job_dir, "hosts", host.label, "host.json"))
    handle.agent(host, "start")


def _mirrored_on(plan: JobPlan, host: RemoteHost) -> list[Replica]:
    """Horovod's ranks on the other nodes start in the launcher's working directory, at the same path."""
    if host.spec.peer_address not in plan.hosts[1:]:
        return []
    return [r for r in plan.replicas if r.host != host.spec.peer_address]


def _replica_spec(replica: Replica, env: Mapping[str, str]) -> dict:
    return {
        "name": replica.name,
        "argv": replica.argv,
        "env": {**replica.env, **env},
        "files": replica.files,
        "rank_logs": replica.rank_logs,
    }
