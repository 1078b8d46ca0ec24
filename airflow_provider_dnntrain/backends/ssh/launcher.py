"""SSH hosts: every replica runs detached on a host named by an Airflow SSH connection.

Each host gets the source snapshot once, in a per-run folder (``<remote_root>/<run id>``, owner-only),
and an agent (``agent.py``, standard library only) that starts replicas under the reaper in their
own sessions, so that a dropped connection does not stop training, and reports their exit codes and
new log lines, one command per host per poll. A replica stops itself when nobody has polled its job
for ``orphan_timeout`` seconds: a host cut off from Airflow cleans up after itself.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.backends.base import JobState, JobStatus, Launcher, LogLine, secret_values
from airflow_provider_dnntrain.backends.common.lines import Redactor
from airflow_provider_dnntrain.backends.common.replica import PENDING_ENV_VAR, PENDING_FILE_VAR, launch_env
from airflow_provider_dnntrain.backends.common.tracking_server import (
    needs_relay,
    refuse_deferral_through_worker,
)
from airflow_provider_dnntrain.backends.ssh import peers, shipping
from airflow_provider_dnntrain.backends.ssh.job import COMMAND_TIMEOUT_SECONDS, SSHJobHandle
from airflow_provider_dnntrain.backends.ssh.placement import HostPlacement, render_on_hosts
from airflow_provider_dnntrain.backends.ssh.remote import (
    HostSpec,
    HostUnreachable,
    RemoteHost,
    hosts_from_connections,
    on_each,
    raise_first,
)
from airflow_provider_dnntrain.backends.ssh.tracking import TrackingRelay
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import Horovod, TorchDistributed, TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, render_plan

log = logging.getLogger(__name__)


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

    def _render(self, job: TrainingJob, run_id: str, placement: HostPlacement, python: str) -> JobPlan:
        """The topology, each replica started by its host's interpreter (a connection's ``python``)."""
        named = {s.peer_address: s.python for s in self.host_specs if s.python}
        return render_on_hosts(job, run_id, placement, python, named)

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
        time_limit: float | None = None,
    ) -> SSHJobHandle:
        source = check_source(job)
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        # Started first: the store's server boots while the source ships.
        relay = None
        if tracking_uri and needs_relay(tracking_uri):
            log_file = self.run_dir(plan.run_id).with_suffix(".tracking-server.log")
            relay = TrackingRelay(tracking_uri, log_file, plan.run_id)
        try:
            return self._submit(job, plan, source, extra_env, pending_env, relay)
        except BaseException:
            if relay is not None:
                relay.close()
            raise

    def _submit(self, job, plan, source, extra_env, pending_env, relay) -> SSHJobHandle:
        handle = self._ship(job, plan, source)
        handle.relay = relay
        secrets = secret_values(job)
        hosts = list(handle.hosts.values())
        env = {**extra_env, **launch_env(handle.launch_id, job.entry_script, handle.plan.chief.name)}
        if relay is not None:
            env["MLFLOW_TRACKING_URI"] = relay.forward(hosts)
        if pending := [*secrets, *pending_env]:
            pending_file = posixpath.join(handle.job_dir, "pending-env.json")
            env.update({PENDING_ENV_VAR: ",".join(pending), PENDING_FILE_VAR: pending_file})
            self.provide_env(handle, secrets)
        try:
            raise_first(on_each(hosts, lambda h: shipping.start_on_host(handle, h, env, self._lease())))
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
        run_dir = self.fresh_run_dir(plan.run_id)
        bundle = shipping.bundle(source, run_dir / "bundle.tar", job.resume_from)
        hosts = self._connect(plan)
        if job.resources.use_gpu:  # before anything is shipped
            shipping.check_gpus(plan, hosts)
        job_dir = hosts[0].absolute(posixpath.join(self.remote_root, plan.run_id))
        counting = self.placement(plan.run_id)
        render_plan(job, plan.run_id, counting, python)
        needed = counting.ports_needed()
        prepared = raise_first(
            on_each(hosts, lambda h: shipping.prepare_host(h, python, job_dir, bundle, needed))
        )
        fetched = inputs.fetch_all(job, self.inputs_root)
        shipping.ship_inputs(fetched, hosts, job_dir, run_dir, python, self.remote_root)
        ports = {h.spec.peer_address: prepared[h.label]["ports"] for h in hosts}
        placement = self.placement(plan.run_id, ports, all(answer["root"] for answer in prepared.values()))
        plan = self._plan_on_hosts(job, plan.run_id, placement, hosts, job_dir)
        (run_dir / "plan.json").write_text(plan.to_json())
        handle = SSHJobHandle(
            run_id=plan.run_id,
            plan=plan,
            python=python,
            run_dir=run_dir,
            job_dir=job_dir,
            launch_id=uuid.uuid4().hex,
            redactor=Redactor(list(secret_values(job).values())),
            hosts={h.label: h for h in hosts},
            replicas_on={h.label: shipping.replicas_on(plan, h) for h in hosts},
        )
        if len(plan.hosts) > 1:  # a runner starts ranks on the other hosts over SSH
            line = peers.grant(hosts, job_dir, handle.launch_id)
            raise_first(handle.on_hosts(lambda h: handle.agent(h, "authorize", line, h.spec.authorized_keys)))
        return handle

    def _plan_on_hosts(
        self, job: TrainingJob, run_id: str, placement: HostPlacement, hosts: list[RemoteHost], job_dir: str
    ) -> JobPlan:
        """The plan with the run folder's inputs and, for a job with packages, the environment each host
        built (its interpreter starts the replicas there)."""
        placed = job.with_inputs_in(posixpath.join(job_dir, "inputs"))
        if not job.environment.has_packages:
            return self._render(placed, run_id, placement, self.interpreter(job))
        python = self.interpreter(job)

        def build(host: RemoteHost) -> str:
            return shipping.build_environment(host, job, job_dir, python, self.remote_root, self.uv_settings)

        built = raise_first(on_each(hosts, build))
        pythons = {h.spec.peer_address: built[h.label] for h in hosts}
        return render_on_hosts(placed, run_id, placement, pythons[hosts[0].spec.peer_address], pythons)

    def _connect(self, plan: JobPlan) -> list[RemoteHost]:
        used = {r.host for r in plan.replicas} | set(plan.hosts)
        hosts = [RemoteHost(s, f"h{i}") for i, s in enumerate(self.host_specs) if s.peer_address in used]
        raise_first(on_each(hosts, RemoteHost.connect))
        return hosts

    def _lease(self) -> dict:
        """How each host's reapers stop their replicas: the grace, and the lease nobody renewed."""
        return {"grace": self.stop_grace_seconds, "lease_timeout": self.orphan_timeout}

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
        handle = SSHJobHandle.from_state(state, list(secret_values(job).values()))
        raise_first(handle.on_hosts(RemoteHost.connect))
        # The pending file keeps the secrets when more values are delivered.
        handle.provided = secret_values(job)
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if state.get("relay_port") and tracking_uri and needs_relay(tracking_uri):
            log_file = handle.run_dir.with_suffix(".tracking-server.log")
            handle.relay = TrackingRelay(tracking_uri, log_file, handle.run_id)
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
            secrets=list(secret_values(job).values()),
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
        timeout = grace_seconds + COMMAND_TIMEOUT_SECONDS
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
            marker = peers.key_marker(handle.launch_id)
            handle.on_hosts(lambda h: handle.agent(h, "revoke", marker, h.spec.authorized_keys))
        if not self.keep_remote_files:
            handle.on_hosts(lambda h: h.run(["rm", "-rf", "--", handle.job_dir], COMMAND_TIMEOUT_SECONDS))
        if handle.relay is not None:
            handle.relay.close()
        for host in handle.hosts.values():
            host.close()
