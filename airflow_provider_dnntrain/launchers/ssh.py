"""SSH hosts: every replica runs detached on a host named by an Airflow SSH connection.

Each host gets the source snapshot once, in a per-run folder (``<remote_root>/<run id>``, owner-only),
and an agent (``ssh_agent.py``, standard library only) that starts replicas under the reaper in their
own sessions, so that a dropped connection does not stop training, and reports their exit codes and
new log lines, one command per host per poll. A replica stops itself when nobody has polled its job
for ``orphan_timeout`` seconds: a host cut off from Airflow cleans up after itself.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import posixpath
import shutil
import tarfile
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.launchers import environments, host_cache, ssh_agent, ssh_peers
from airflow_provider_dnntrain.launchers.base import (
    ENTRY_SCRIPT_VAR,
    ENVIRONMENT_RECORD,
    LAUNCH_ID_VAR,
    PENDING_ENV_VAR,
    PENDING_FILE_VAR,
    PRIMARY_REPLICA_VAR,
    REAPER,
    REPLICA_SITE,
    REPLICA_SITE_MODULES,
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    requirements_of,
)
from airflow_provider_dnntrain.launchers.environments import (
    BUILD_TIMEOUT_SECONDS as ENVIRONMENT_BUILD_SECONDS,
)
from airflow_provider_dnntrain.launchers.environments import EnvironmentBuildFailed
from airflow_provider_dnntrain.launchers.gpu_check import LIST_GPUS, check_host_gpus, listed_gpus
from airflow_provider_dnntrain.launchers.local_logs import Redactor
from airflow_provider_dnntrain.launchers.ssh_job import COMMAND_TIMEOUT_SECONDS as _COMMAND_TIMEOUT_SECONDS
from airflow_provider_dnntrain.launchers.ssh_job import SSHJobHandle
from airflow_provider_dnntrain.launchers.ssh_job import run_agent as _agent
from airflow_provider_dnntrain.launchers.ssh_remote import (
    HostSpec,
    HostUnreachable,
    RemoteCommandFailed,
    RemoteHost,
    hosts_from_connections,
    on_each,
    raise_first,
)
from airflow_provider_dnntrain.launchers.ssh_tracking import (
    TrackingRelay,
    needs_relay,
    refuse_deferral_through_worker,
)
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.source import snapshot as copy_snapshot
from airflow_provider_dnntrain.spec import Horovod, TorchDistributed, TrainingJob
from airflow_provider_dnntrain.topology import Endpoint, JobPlan, Replica, render_plan

log = logging.getLogger(__name__)
INPUT_UNPACK_SECONDS = 1800
AGENT = Path(ssh_agent.__file__)


class HostPlacement:
    """Replicas spread over the hosts in the order the topology asks for them (the first replica on the
    first host, the next on the next...), each on a port free on its host (``ports``) or, before a
    run, the topology's default port."""

    def __init__(self, hosts: Sequence[str], ports: Mapping[str, list[int]] | None, runs_as_root: bool):
        self.hosts = list(hosts)
        self.runs_as_root = runs_as_root
        self._free = {host: list(ports.get(host, [])) for host in hosts} if ports else None
        self._assigned: dict[tuple[str, int], Endpoint] = {}

    def endpoint(self, role: str, index: int, default_port: int) -> Endpoint:
        key = (role, index)
        if key not in self._assigned:
            host = self.hosts[len(self._assigned) % len(self.hosts)]
            on_host = sum(1 for e in self._assigned.values() if e.host == host)
            port = self._free[host].pop(0) if self._free is not None else default_port + on_host
            self._assigned[key] = Endpoint(host, port)
        return self._assigned[key]

    def ports_needed(self) -> dict[str, int]:
        counts = collections.Counter(e.host for e in self._assigned.values())
        return {host: counts.get(host, 0) for host in self.hosts}


class SSHLauncher(Launcher):
    """Run every replica on SSH hosts named by Airflow SSH connections.

    ``ssh_conn_ids``: one connection per host, or connections whose extra lists ``hosts``; a
    connection's extra ``address`` is how the other hosts reach that host (default: its host).
    Host keys are verified (``~/.ssh/known_hosts``, or the key pinned in the connection's extra
    ``host_key``); an unknown key is refused unless the connection says ``no_host_key_check``.
    ``python``: the job's interpreter, an absolute path on the hosts (default: the job's
    environment's, else this worker's own); a connection's extra ``python`` overrides it for its
    hosts. ``remote_root``: per-run folders on the hosts, at the same path on each (runners start
    ranks there); a relative one is relative to the first host's home.
    ``environment.pip_packages``: built with ``uv`` on each host, beside the hosts' run folders
    (``<remote_root>/../environments``), cached there; ``uv_settings``: ``UV_*`` variables those builds
    run with (hosts without the internet: ``UV_INDEX_URL`` of an internal index, or
    ``UV_FIND_LINKS`` of wheels on a shared disk with ``UV_OFFLINE=1``).
    """

    name = "ssh"

    def __init__(
        self,
        *,
        ssh_conn_ids: str | Sequence[str],
        python: str | None = None,
        remote_root: str = ".dnntrain/runs",
        work_root: str | None = None,
        stop_grace_seconds: float = 10.0,
        poll_interval: float = 1.0,
        unreachable_timeout: float = 20.0,
        orphan_timeout: float = 300.0,
        keep_remote_files: bool = False,
        uv_settings: Mapping[str, str] | None = None,
        inputs_root: str | None = None,
    ) -> None:
        self.ssh_conn_ids = [ssh_conn_ids] if isinstance(ssh_conn_ids, str) else list(ssh_conn_ids)
        self.uv_settings = dict(uv_settings or {})
        self.inputs_root = Path(inputs_root) if inputs_root else inputs.default_cache_root()
        self.python = python
        self.remote_root = remote_root
        self.work_root = Path(work_root) if work_root else None
        self.stop_grace_seconds = stop_grace_seconds
        self.poll_interval = poll_interval
        self.unreachable_timeout = unreachable_timeout
        self.orphan_timeout = orphan_timeout
        self.keep_remote_files = keep_remote_files
        if not self.ssh_conn_ids:
            raise ValueError("ssh_conn_ids: name at least one SSH connection")

    @cached_property
    def host_specs(self) -> list[HostSpec]:
        return hosts_from_connections(self.ssh_conn_ids)

    def interpreter(self, job: TrainingJob) -> str:
        return self.python or super().interpreter(job)

    def placement(
        self, run_id: str, ports: Mapping[str, list[int]] | None = None, runs_as_root: bool = False
    ) -> HostPlacement:
        return HostPlacement([h.peer_address for h in self.host_specs], ports, runs_as_root)

    def inputs_folder(self, run_id: str) -> str:
        """Relative to the first host's home until the hosts are reached (then :meth:`_ship` renders the
        plan with the absolute folder)."""
        return posixpath.join(self.remote_root, run_id, "inputs")

    def plan(self, job: TrainingJob, run_id: str) -> JobPlan:
        self._check_node_count(job)
        self.validate(job)
        placed = job.with_inputs_in(self.inputs_folder(run_id))
        return self._render(placed, run_id, self.placement(run_id), self.interpreter(job))

    def _render(
        self,
        job: TrainingJob,
        run_id: str,
        placement: HostPlacement,
        python: str,
        interpreters: Mapping[str, str] | None = None,
    ) -> JobPlan:
        """The topology, each replica's interpreter being its host's own (a connection's ``python``, or
        the job's environment built there: ``interpreters`` by peer address)."""
        plan = render_plan(job, run_id, placement, python)
        named = interpreters or {s.peer_address: s.python for s in self.host_specs if s.python}
        own = {host: path for host, path in named.items() if path != python}
        if not own:
            return plan
        if len({own.get(host, python) for host in plan.hosts}) > 1:
            raise ValueError(
                f"python: {job.distribution.kind}'s runner starts every rank with one command line, but "
                f"its hosts name different interpreters ({', '.join(sorted({*own.values(), python}))}); "
                "give them the same path"
            )
        on_host = [
            dataclasses.replace(r, argv=[own[r.host] if a == python else a for a in r.argv])
            if r.host in own
            else r
            for r in plan.replicas
        ]
        return dataclasses.replace(plan, replicas=on_host)

    def preview(self, job: TrainingJob, run_id: str) -> JobPlan:
        return self.plan(job, run_id)

    def _check_node_count(self, job: TrainingJob) -> None:
        dist = job.distribution
        if isinstance(dist, (TorchDistributed, Horovod)) and dist.node_count > len(self.host_specs):
            raise ValueError(
                f"distribution.node_count: {dist.node_count} nodes, but the SSH launcher has "
                f"{len(self.host_specs)} host(s) ({', '.join(map(str, self.host_specs))})"
            )

    # -- submit ---------------------------------------------------------------------------------

    def submit(
        self,
        job: TrainingJob,
        plan: JobPlan,
        extra_env: Mapping[str, str],
        *,
        pending_env: Collection[str] = (),
    ) -> SSHJobHandle:
        source = check_source(job)
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        # Started first: the store's server boots while the source ships.
        relay = None
        if tracking_uri and needs_relay(tracking_uri):
            relay = TrackingRelay(tracking_uri, self.run_dir(plan.run_id).with_suffix(".tracking-server.log"))
        try:
            return self._submit(job, plan, source, extra_env, pending_env, relay)
        except BaseException:
            if relay is not None:
                relay.close()
            raise

    def _submit(self, job, plan, source, extra_env, pending_env, relay) -> SSHJobHandle:
        handle = self._ship(job, plan, source)
        handle.relay = relay
        secrets = _secrets(job)
        hosts = list(handle.hosts.values())
        launch_env = {
            **extra_env,
            "PYTHONUNBUFFERED": "1",
            LAUNCH_ID_VAR: handle.launch_id,
            ENTRY_SCRIPT_VAR: job.entry_script,
            PRIMARY_REPLICA_VAR: handle.plan.chief.name,
        }
        if relay is not None:
            launch_env["MLFLOW_TRACKING_URI"] = relay.forward(hosts)
        if pending := [*secrets, *pending_env]:
            pending_file = posixpath.join(handle.job_dir, "pending-env.json")
            launch_env.update({PENDING_ENV_VAR: ",".join(pending), PENDING_FILE_VAR: pending_file})
            self.provide_env(handle, secrets)
        try:
            raise_first(on_each(hosts, lambda h: self._start(handle, h, launch_env)))
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        now = time.monotonic()
        handle.last_answer = {label: now for label in handle.hosts}
        return handle

    def _ship(self, job: TrainingJob, plan: JobPlan, source: Path) -> SSHJobHandle:
        """Connect, ship the source once per host, plan with the ports the hosts found free, and let
        the hosts reach each other when a runner needs to; nothing runs yet."""
        python = self.interpreter(job)
        run_dir = self.run_dir(plan.run_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        run_dir.chmod(0o700)
        bundle = _bundle(source, run_dir / "bundle.tar", job.resume_from)
        hosts = self._connect(plan)
        if job.resources.use_gpu:  # before anything is shipped
            _check_gpus(plan, hosts)
        job_dir = hosts[0].absolute(posixpath.join(self.remote_root, plan.run_id))
        counting = self.placement(plan.run_id)
        render_plan(job, plan.run_id, counting, python)
        needed = counting.ports_needed()
        prepared = raise_first(on_each(hosts, lambda h: self._prepare(h, python, job_dir, bundle, needed)))
        self._ship_inputs(job, hosts, job_dir, run_dir)
        placed = job.with_inputs_in(posixpath.join(job_dir, "inputs"))
        ports = {h.spec.peer_address: prepared[h.label]["ports"] for h in hosts}
        as_root = all(answer["root"] for answer in prepared.values())
        placement = self.placement(plan.run_id, ports, as_root)
        if job.environment.has_packages:
            built = raise_first(on_each(hosts, lambda h: self._build_environment(h, job, job_dir)))
            pythons = {h.spec.peer_address: built[h.label] for h in hosts}
            plan = self._render(placed, plan.run_id, placement, pythons[hosts[0].spec.peer_address], pythons)
        else:
            plan = self._render(placed, plan.run_id, placement, python)
        (run_dir / "plan.json").write_text(plan.to_json())
        handle = SSHJobHandle(
            run_id=plan.run_id,
            plan=plan,
            python=python,
            run_dir=run_dir,
            job_dir=job_dir,
            launch_id=uuid.uuid4().hex,
            redactor=Redactor(list(_secrets(job).values())),
            hosts={h.label: h for h in hosts},
            replicas_on={h.label: _replicas_on(plan, h) for h in hosts},
        )
        if len(plan.hosts) > 1:  # a runner starts ranks on the other hosts over SSH
            line = ssh_peers.grant(hosts, job_dir, handle.launch_id)
            raise_first(handle.on_hosts(lambda h: handle.agent(h, "authorize", line, h.spec.authorized_keys)))
        return handle

    def _connect(self, plan: JobPlan) -> list[RemoteHost]:
        used = {r.host for r in plan.replicas} | set(plan.hosts)
        hosts = [RemoteHost(s, f"h{i}") for i, s in enumerate(self.host_specs) if s.peer_address in used]
        raise_first(on_each(hosts, RemoteHost.connect))
        return hosts

    def _ship_inputs(self, job: TrainingJob, hosts: list[RemoteHost], folder: str, run_dir: Path) -> None:
        """Every input the job downloads: fetched here once (this worker's cache), then put in each
        host's cache (``<remote_root>/../inputs``) unless it is there already; ``<run folder>/inputs/
        <name>`` points at it, the same path on every host."""
        fetched = inputs.fetch_all(job, self.inputs_root)
        if not fetched:
            return
        tars: dict[str, Path] = {}
        making = threading.Lock()

        def tar_of(key: str, entry: Path) -> Path:
            with making:  # one tar per input, whichever host asks first
                if key not in tars:
                    tars[key] = _tar_folder(entry, run_dir / f"input-{key}.tar")
                return tars[key]

        def ship(host: RemoteHost) -> None:
            tool = [host.spec.python or self.interpreter(job), "-I", "-S"]
            tool.append(posixpath.join(folder, "dnntrain", "host_cache.py"))
            root = host.absolute(posixpath.join(posixpath.dirname(self.remote_root.rstrip("/")), "inputs"))
            keys = [resolved.key for resolved, _ in fetched.values()]
            missing = json.loads(host.run([*tool, "missing", root, *keys], _COMMAND_TIMEOUT_SECONDS))
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
            host.run([*tool, "link", *links], _COMMAND_TIMEOUT_SECONDS)

        try:
            raise_first(on_each(hosts, ship))
        finally:
            for tar in tars.values():
                tar.unlink(missing_ok=True)

    def _build_environment(self, host: RemoteHost, job: TrainingJob, folder: str) -> str:
        """Build (or find) the job's environment on ``host`` with its interpreter; its resolved packages
        go with the chief's logs (``logs/environment.txt``). The environment's interpreter."""
        base = host.spec.python or self.interpreter(job)
        script = posixpath.join(folder, "dnntrain", "environments.py")
        host.put_file(Path(environments.__file__), script)
        root = host.absolute(posixpath.join(posixpath.dirname(self.remote_root.rstrip("/")), "environments"))
        spec = {
            "python": base,
            "packages": job.environment.pip_packages,
            "requirements": requirements_of(job),
            "uv_settings": self.uv_settings,
        }
        answer = host.run_json([base, "-I", "-S", script, root, json.dumps(spec)], ENVIRONMENT_BUILD_SECONDS)
        if "error" in answer:
            raise EnvironmentBuildFailed(f"host {host.spec}: {answer['error']}")
        logs = posixpath.join(folder, "hosts", host.label, "source", "logs")
        host.makedirs(logs)
        host.put(answer["freeze"].encode(), posixpath.join(logs, ENVIRONMENT_RECORD), mode=0o644)
        log.info(
            "Environment %s on host %s (%s)",
            answer["key"],
            host.spec,
            "built" if answer["built"] else "cached",
        )
        return answer["python"]

    def _prepare(self, host: RemoteHost, python: str, folder: str, bundle: Path, ports: dict) -> dict:
        """Ship the agent, the reaper, the replica site and the source; the agent ends what a previous
        launch of the same run id left on the host, and answers with free ports."""
        support = posixpath.join(folder, "dnntrain")
        host.makedirs(posixpath.join(support, "replica_site"))
        host.makedirs(posixpath.join(folder, "hosts", host.label))
        for local, remote in [
            (AGENT, "ssh_agent.py"),
            (REAPER, "reaper.py"),
            (Path(host_cache.__file__), "host_cache.py"),
            *((REPLICA_SITE / name, f"replica_site/{name}") for name in REPLICA_SITE_MODULES),
        ]:
            host.put_file(local, posixpath.join(support, remote))
        host.put_file(bundle, posixpath.join(folder, "hosts", host.label, "bundle.tar"))
        return _agent(host, python, folder, "prepare", str(ports.get(host.spec.peer_address, 0)))

    def _start(self, handle: SSHJobHandle, host: RemoteHost, launch_env: Mapping[str, str]) -> None:
        names = handle.replicas_on[host.label]
        mirrored = self._mirrored_on(handle.plan, host)
        spec = {
            "launch_id": handle.launch_id,
            "grace": self.stop_grace_seconds,
            "lease_timeout": self.orphan_timeout,
            "replicas": [_replica_spec(handle.plan.replica(n), launch_env) for n in names],
            "mirrors": [_replica_spec(r, {}) for r in mirrored],
        }
        host.put(json.dumps(spec).encode(), posixpath.join(handle.job_dir, "hosts", host.label, "host.json"))
        handle.agent(host, "start")

    @staticmethod
    def _mirrored_on(plan: JobPlan, host: RemoteHost) -> list[Replica]:
        """Horovod's ranks on the other nodes start in the launcher's working directory, at the same path."""
        if host.spec.peer_address not in plan.hosts[1:]:
            return []
        return [r for r in plan.replicas if r.host != host.spec.peer_address]

    def provide_env(self, handle: SSHJobHandle, values: Mapping[str, str]) -> None:
        """Write the values to every host: at once while submitting; later with each host's next poll
        (in its own thread, so a host that stalls holds up neither the others nor the wait)."""
        if handle.relay is not None and "MLFLOW_RUN_ID" in values:
            handle.relay.start_server()  # the run, and so the store, exists now
        handle.provided.update(values)
        handle.undelivered = set(handle.hosts)
        if not handle.last_answer:  # still submitting: every host gets them before anything starts
            raise_first(handle.on_hosts(lambda h: self._deliver(handle, h)))
        else:
            handle.last_fetch = 0.0  # deliver with the next poll, right away

    def _deliver(self, handle: SSHJobHandle, host: RemoteHost) -> None:
        host.put(json.dumps(handle.provided).encode(), posixpath.join(handle.job_dir, "pending-env.json"))
        handle.undelivered.discard(host.label)

    def _deliver_and_poll(self, handle: SSHJobHandle, host: RemoteHost) -> dict:
        if host.label in handle.undelivered:
            self._deliver(handle, host)
        return handle.poll_host(host, self.unreachable_timeout)

    # -- surviving the task process -------------------------------------------------------------

    def state(self, handle: SSHJobHandle) -> dict:
        return handle.to_state()

    def reattach(self, state: dict, job: TrainingJob, extra_env: Mapping[str, str]) -> SSHJobHandle:
        """Take over a job another process started: its replicas run on, detached; the relay to the
        tracking store, if it had one, is rebuilt on the port they already use (it serves the store
        once the tracking run is delivered again, as at submit)."""
        handle = SSHJobHandle.from_state(state, list(_secrets(job).values()))
        raise_first(handle.on_hosts(RemoteHost.connect))
        # The pending file keeps the secrets when more values are delivered.
        handle.provided = _secrets(job)
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if state.get("relay_port") and tracking_uri and needs_relay(tracking_uri):
            handle.relay = TrackingRelay(tracking_uri, handle.run_dir.with_suffix(".tracking-server.log"))
            handle.relay.forward(handle.reachable(), state["relay_port"])
        return handle

    def check_deferrable(self, extra_env: Mapping[str, str]) -> None:
        refuse_deferral_through_worker(extra_env, "the hosts")

    def trigger(self, handle: SSHJobHandle, job: TrainingJob, timeout: float | None):
        # The trigger only watches: what is still to be delivered goes now.
        waiting = [h for h in handle.reachable() if h.label in handle.undelivered]
        raise_first(on_each(waiting, lambda h: self._deliver(handle, h)))
        from airflow_provider_dnntrain.triggers.ssh import SSHJobTrigger

        return SSHJobTrigger(
            state=handle.to_state(),
            secrets=list(_secrets(job).values()),
            poll_interval=self.poll_interval,
            unreachable_timeout=self.unreachable_timeout,
            timeout=timeout,
            grace_seconds=self.stop_grace_seconds,
        )

    # -- observe --------------------------------------------------------------------------------

    def poll(self, handle: SSHJobHandle) -> JobStatus:
        if handle.cancelled:
            return JobStatus(JobState.CANCELLED, f"job {handle.run_id} was cancelled")
        if time.monotonic() - handle.last_fetch >= self.poll_interval:
            self._fetch(handle)
            handle.status = handle.evaluate(self.unreachable_timeout)
        return handle.status

    def _fetch(self, handle: SSHJobHandle) -> None:
        """One command per host: renew the lease, read exit codes and every new log line."""
        with handle._lock:
            handle.last_fetch = time.monotonic()
            answers = handle.on_hosts(lambda h: self._deliver_and_poll(handle, h))
            for label, answer in answers.items():
                handle.take_answer(label, answer)

    def stream_logs(self, handle: SSHJobHandle, timeout: float) -> Iterable[LogLine]:
        if not handle.lines and timeout > 0:
            time.sleep(min(timeout, max(0.0, handle.last_fetch + self.poll_interval - time.monotonic())))
        return handle.take_lines()

    def tail(self, handle: SSHJobHandle, replica: str) -> list[str]:
        return list(handle.tails.get(replica, []))

    # -- stop -----------------------------------------------------------------------------------

    def cancel(self, handle: SSHJobHandle) -> None:
        """Ask every host to stop the job and return at once: the reapers escalate on their own."""
        handle.cancelled = True

        def ask() -> None:
            handle.on_hosts(lambda h: handle.agent(h, "stop", "0", "--no-wait"))

        threading.Thread(target=ask, daemon=True).start()

    def stop(self, handle: SSHJobHandle, grace_seconds: float) -> None:
        if handle.stopped:
            return
        timeout = grace_seconds + _COMMAND_TIMEOUT_SECONDS
        results = handle.on_hosts(lambda h: handle.agent(h, "stop", str(grace_seconds), timeout=timeout))
        stuck = []
        for label, result in results.items():
            if isinstance(result, HostUnreachable):
                handle.lost.add(label)
                handle.hosts[label].last_error = str(result)
            elif isinstance(result, BaseException):
                raise result
            elif result["stuck"]:
                stuck.append(f"{handle.hosts[label].spec}: pids {result['stuck']}")
        handle.stopped = True
        self._fetch(handle)  # what the replicas wrote while stopping, and any line left unfinished
        handle.flush()
        for label in sorted(handle.lost):
            log.warning(
                "Could not stop run %s on host %s (%s); its replicas stop themselves once nobody has "
                "polled them for %.0f s",
                handle.run_id,
                handle.hosts[label].spec,
                handle.hosts[label].last_error,
                self.orphan_timeout,
            )
        if stuck:
            raise RuntimeError(f"run {handle.run_id}: processes could not be stopped on {'; '.join(stuck)}")

    # -- outputs --------------------------------------------------------------------------------

    def collect_outputs(self, handle: SSHJobHandle) -> Path:
        """Fetch the primary process's outputs and logs and every replica's console log; then remove the
        job's folders from the hosts (unless ``keep_remote_files``): this is the last step of a run."""
        try:
            return handle.fetch_outputs()
        finally:
            self._clean_up(handle)

    def _clean_up(self, handle: SSHJobHandle) -> None:
        """Revoke the run's own key and, unless ``keep_remote_files``, remove the job's folder."""
        if len(handle.plan.hosts) > 1:
            marker = ssh_peers.key_marker(handle.launch_id)
            handle.on_hosts(lambda h: handle.agent(h, "revoke", marker, h.spec.authorized_keys))
        if not self.keep_remote_files:
            handle.on_hosts(lambda h: h.run(["rm", "-rf", "--", handle.job_dir], _COMMAND_TIMEOUT_SECONDS))
        if handle.relay is not None:
            handle.relay.close()
        for host in handle.hosts.values():
            host.close()


def _secrets(job: TrainingJob) -> dict[str, str]:
    return {name: value.get_secret_value() for name, value in job.environment.secrets.items()}


def _replicas_on(plan: JobPlan, host: RemoteHost) -> list[str]:
    return [r.name for r in plan.replicas if r.host == host.spec.peer_address]


def _replica_spec(replica: Replica, launch_env: Mapping[str, str]) -> dict:
    return {
        "name": replica.name,
        "argv": replica.argv,
        "env": {**replica.env, **launch_env},
        "files": replica.files,
        "rank_logs": replica.rank_logs,
    }


def _check_gpus(plan: JobPlan, hosts: list[RemoteHost]) -> None:
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
        return listed_gpus(host.run(LIST_GPUS, _COMMAND_TIMEOUT_SECONDS)), "nvidia-smi -L lists no GPU"
    except RemoteCommandFailed as error:  # not installed (exit 127), or no driver
        return 0, str(error)


def _tar_folder(folder: Path, target: Path) -> Path:
    with tarfile.open(target, "w") as tar:
        for child in sorted(folder.iterdir()):
            tar.add(child, arcname=child.name)
    return target


def _bundle(source: Path, target: Path, resume: str | None = None) -> Path:
    """The source snapshot (and an earlier run's outputs to resume from) as one tar, uploaded once per
    host."""
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        snapshot = Path(scratch) / "source"
        copy_snapshot(source, snapshot, resume)
        with tarfile.open(target, "w") as tar:
            tar.add(snapshot, arcname="source")
    return target
