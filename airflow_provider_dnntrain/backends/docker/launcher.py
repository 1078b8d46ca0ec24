"""Docker: every replica a container on one Docker daemon, on a network of the run's own where replicas
reach each other by name (``<run>-<role>-<index>``), or on the host's network, through the Docker SDK.

Each container starts from the run's bundle (put into it before it starts, as a tar stream: the daemon
may be on another host): the bootstrap unpacks the source snapshot into ``/dnntrain/run``, puts the
replica site first on the path and becomes the replica's argv. Secrets and the variables pending at
submit reach the script's processes through a file put into each container (``/dnntrain/secrets``),
never through its environment, so ``docker inspect`` shows none. Stopping saves the primary
replica's outputs, then removes every container and the network of the run; so does a new submit of
the same run id. Each run has a watchdog container (``watchdog.py``, the daemon's socket mounted):
while the task watches the run it renews the run's lease there; once the lease has not changed for
``orphan_timeout`` seconds (the task SIGKILLed, its worker lost), or the task asks (``on_kill``), the
watchdog stops and removes the whole run, itself last. Horovod's runner reaches its other nodes'
containers (``<run>-node-<i>``, serving SSH with keys made for the run) as on Kubernetes. Inputs are
fetched by the containers' bootstrap into a volume of the daemon every run shares. Another process
takes a run over from its state (the log cursors are the daemon's timestamps); the triggerer waits on
it the same way (``triggers/docker.py``).
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.backends.base import (
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    aggregate_status,
    collected_artifacts,
    secret_values,
)
from airflow_provider_dnntrain.backends.common.bundle import default_image, run_bundle
from airflow_provider_dnntrain.backends.common.docker_client import OnDaemon
from airflow_provider_dnntrain.backends.common.docker_files import put_files, tar_of
from airflow_provider_dnntrain.backends.common.environment_images import BuiltImage, ImageBuilding
from airflow_provider_dnntrain.backends.common.keys import run_ssh_files
from airflow_provider_dnntrain.backends.common.lines import Redactor
from airflow_provider_dnntrain.backends.common.ports import FreePortPlacement
from airflow_provider_dnntrain.backends.common.replica import (
    ENVIRONMENT_RECORD,
    PENDING_ENV_VAR,
    PENDING_FILE_VAR,
    launch_env,
)
from airflow_provider_dnntrain.backends.common.tracking_server import (
    StoreServer,
    needs_relay,
    refuse_deferral_through_worker,
)
from airflow_provider_dnntrain.backends.docker import containers as specs
from airflow_provider_dnntrain.backends.docker import watchdog
from airflow_provider_dnntrain.backends.docker.job import (
    DockerJobHandle,
    copy_out,
    remove_run,
    start_container,
)
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)
SIGNED_URL_SECONDS = 3600  # how long the containers have to start fetching an object store's inputs


class DockerLauncher(OnDaemon, Launcher):
    """Run every replica in a container on the Docker daemon at ``docker_url`` (default: the
    environment's, ``DOCKER_HOST`` or the local socket).

    ``image``: the replicas' image (default: the project's training image for the job's framework,
    ``dnntrain-{torch,tensorflow}:{cpu,gpu}``, or the job's ``environment.image``); ``python``: its
    interpreter. A job whose environment has ``pip_packages`` or a ``requirements_file`` runs on an
    image built from that one (``common/environment_images.py``), pushed to ``image_registry``
    (``host[:port][/namespace]``) or to the registry of the Airflow docker connection ``docker_conn_id``
    (its host, login and password) when one is given.

    ``orphan_timeout``: how long a run outlives a task that stopped renewing its lease (SIGKILLed, its
    worker lost) before its watchdog removes it. ``daemon_socket``: the daemon's socket on its own
    host, mounted into the watchdog (default: ``docker_url``'s, for ``unix://``, else
    ``/var/run/docker.sock``). ``host_network=True``: the containers on the Docker host's network,
    meeting at 127.0.0.1 on ports free here (a daemon on this host). The chief's outputs that cannot be
    copied out of its container fail the run (``OutputsLost``) unless ``outputs_required=False``.
    """

    name = "docker"

    def __init__(
        self,
        *,
        docker_url: str | None = None,
        image: str | None = None,
        python: str = "python",
        work_root: str | None = None,
        stop_grace_seconds: float = 10.0,
        orphan_timeout: float = 300.0,
        lease_interval: float = 10.0,
        daemon_socket: str | None = None,
        image_registry: str | None = None,
        docker_conn_id: str | None = None,
        host_network: bool = False,
        outputs_required: bool = True,
    ) -> None:
        self.docker_url = docker_url
        self.image, self.python = image, python
        self.work_root = Path(work_root) if work_root else None
        self.stop_grace_seconds = stop_grace_seconds
        self.orphan_timeout, self.lease_interval = orphan_timeout, lease_interval
        self.daemon_socket = daemon_socket
        self.building = ImageBuilding(docker_url, image_registry, docker_conn_id)
        self.host_network, self.outputs_required = host_network, outputs_required

    def placement(self, run_id: str) -> specs.DockerPlacement | FreePortPlacement:
        """Names on the run's network; on the host's, 127.0.0.1 and ports free on this host (which is
        the Docker host: host networking needs a local daemon)."""
        return FreePortPlacement() if self.host_network else specs.DockerPlacement(run_id)

    def interpreter(self, job: TrainingJob) -> str:
        return job.environment.python or self.python

    def inputs_folder(self, run_id: str) -> str:
        return f"{specs.WORKDIR}/inputs"

    def validate(self, job: TrainingJob) -> None:
        super().validate(job)
        for item in job.inputs:
            if item.downloads and item.scheme == "file":
                raise ValueError(
                    f"inputs.{item.name}.uri: {item.uri} is on the Airflow worker's disk, which containers "
                    "do not read: put it where they fetch it from (s3://, gs://, https://...), or give a "
                    "path on the Docker host with mode='mount'"
                )
        if self.host_network and isinstance(job.distribution, Horovod) and job.distribution.node_count > 1:
            raise ValueError(
                "distribution.node_count: Horovod's nodes reach each other over SSH on the run's network; "
                "on the host's network (host_network=True) it runs in one container (node_count=1)"
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
    ) -> DockerJobHandle:
        source = check_source(job)
        image = self._image(job)  # built first: a failed build leaves nothing of the run
        remove_run(self.client.api, plan.run_id)  # what an earlier submit of this run id left
        run_dir = self.fresh_run_dir(plan.run_id)
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = secret_values(job)
        handle = DockerJobHandle(
            run_id=plan.run_id, plan=plan, name=specs.run_name(plan.run_id), run_dir=run_dir,
            redactor=Redactor(secrets.values()), pending=dict(secrets), environment_record=image.freeze,
        )  # fmt: skip
        try:
            env = self._environment(handle, job, extra_env, [*secrets, *pending_env])
            bundle = run_bundle(source, plan, job.resume_from)
            self._create(handle, job, image.tag, env, bundle)
            for replica, container in handle.containers.items():
                start_container(self.client.api, container, job.resources.use_gpu)
                handle.follow(self.client.api, replica)
            handle.lease_renewed = time.monotonic()
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        return handle

    def _environment(self, handle, job: TrainingJob, extra_env, pending: list[str]) -> dict[str, str]:
        """The run's network (none on the host's), and the variables every replica gets."""
        gateway = "127.0.0.1"  # on the host's network, the containers reach this host there
        if not self.host_network:
            network = self.client.networks.create(
                handle.name, driver="bridge", labels=specs.labels(handle.run_id)
            )
            handle.network = network.id
            network.reload()
            gateway = network.attrs["IPAM"]["Config"][0]["Gateway"]
        env = {**extra_env, **launch_env(uuid.uuid4().hex, job.entry_script, handle.plan.chief.name)}
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if tracking_uri and needs_relay(tracking_uri):
            env["MLFLOW_TRACKING_URI"] = self._serve_tracking(handle, tracking_uri, gateway)
        if pending:
            env.update({PENDING_ENV_VAR: ",".join(pending), PENDING_FILE_VAR: specs.PENDING_FILE})
        return env

    def _serve_tracking(self, handle: DockerJobHandle, tracking_uri: str, gateway: str) -> str:
        """The embedded store served at ``gateway``: this host, as its containers see it (a daemon on this
        host; a remote daemon's containers need a tracking server they reach)."""
        log_file = handle.run_dir.with_suffix(".tracking-server.log")
        handle.relay = StoreServer(tracking_uri, log_file, handle.run_id, listen=(gateway, 0))
        handle.relay.start(run_exists=False)
        return f"http://{gateway}:{handle.relay.target[1]}"

    def _image(self, job: TrainingJob) -> BuiltImage:
        """The job's image: its base as it is, or its environment's, built (or found) now."""
        base = job.environment.image or self.image or default_image(job)
        if not job.environment.has_packages:
            return BuiltImage(base, False, "")
        return self.building.ensure(job, base, self.interpreter(job), self.client)

    def _create(self, handle, job: TrainingJob, image: str, env: dict, bundle: dict[str, bytes]) -> None:
        self._start_watchdog(handle, image, self.interpreter(job))
        files = {specs.member(f"{specs.BUNDLE}/{name}"): content for name, content in bundle.items()}
        secret_files = self._secret_files(handle, job)
        network = None if self.host_network else handle.name
        configs = specs.run_containers(
            handle.plan, image=image, python=self.interpreter(job), network=network, env=env
        )
        volumes = specs.input_volumes(job)
        for name, config in configs.items():
            config["volumes"] = volumes
            container = self.client.containers.create(**config)
            handle.containers[name] = container.id
            self.client.api.put_archive(container.id, specs.ROOT, tar_of(files))
            self._put_pending(handle, container.id)
            if secret_files:
                put_files(self.client.api, container.id, secret_files, mode=0o400)

    def _secret_files(self, handle: DockerJobHandle, job: TrainingJob) -> dict[str, bytes]:
        """What only root reads in each container: the inputs' signed URLs and a web server's credentials,
        and the SSH keys of a run whose runner reaches other nodes."""
        found = {}
        if any(item.downloads for item in job.inputs):
            found[specs.INPUT_SOURCES] = inputs.pod_sources(job, SIGNED_URL_SECONDS).encode()
        if specs.ssh_nodes(handle.plan):
            keys = run_ssh_files(handle.name)
            found.update({f"{specs.SSH_DIR}/{name}": content.encode() for name, content in keys.items()})
        return found

    def _socket(self) -> str:
        """The daemon's socket on its host: given, or ``docker_url``'s (or ``DOCKER_HOST``'s) for a
        ``unix://`` one, else Docker's default."""
        if self.daemon_socket:
            return self.daemon_socket
        url = self.docker_url or os.environ.get("DOCKER_HOST", "")
        return url.removeprefix("unix://") if url.startswith("unix://") else "/var/run/docker.sock"

    def _start_watchdog(self, handle: DockerJobHandle, image: str, python: str) -> None:
        config = specs.watchdog_config(
            handle.run_id, image=image, python=python, socket=self._socket(),
            timeout=self.orphan_timeout, grace=self.stop_grace_seconds,
        )  # fmt: skip
        handle.watchdog = self.client.containers.create(**config).id
        code = {
            specs.member(f"{specs.BUNDLE}/watchdog.py"): Path(watchdog.__file__).read_bytes(),
            specs.member(specs.LEASE_FILE): b"0",
        }
        self.client.api.put_archive(handle.watchdog, specs.ROOT, tar_of(code))
        self.client.api.start(handle.watchdog)

    def _put_pending(self, handle: DockerJobHandle, container: str) -> None:
        if handle.pending:
            secret = tar_of(
                {specs.member(specs.PENDING_FILE): json.dumps(handle.pending).encode()}, mode=0o600
            )
            self.client.api.put_archive(container, specs.ROOT, secret)

    def provide_env(self, handle: DockerJobHandle, values: Mapping[str, str]) -> None:
        if handle.relay is not None and "MLFLOW_RUN_ID" in values:
            handle.relay.start()  # the tracking run exists: the store has its tables
        handle.pending.update(values)
        for container in handle.containers.values():
            self._put_pending(handle, container)

    # -- watching ---------------------------------------------------------------------------------

    def poll(self, handle: DockerJobHandle) -> JobStatus:
        if handle.cancelled:
            return JobStatus(JobState.CANCELLED, f"run {handle.run_id} cancelled")
        for replica, container in handle.containers.items():
            state = self.client.api.inspect_container(container)["State"]
            running = state["Running"] or state["Status"] == "created"
            handle.exit_codes[replica] = None if running else state["ExitCode"]
        if time.monotonic() - handle.lease_renewed > self.lease_interval:
            self._renew_lease(handle)
        status = aggregate_status(handle.plan, handle.exit_codes)
        return (handle.ended_node() or status) if status.state is JobState.RUNNING else status

    def _renew_lease(self, handle: DockerJobHandle, value: str | None = None) -> None:
        lease = tar_of({specs.member(specs.LEASE_FILE): (value or str(time.time())).encode()})
        self.client.api.put_archive(handle.watchdog, specs.ROOT, lease)
        handle.lease_renewed = time.monotonic()

    # -- surviving the task process -------------------------------------------------------------

    def state(self, handle: DockerJobHandle) -> dict:
        return handle.to_state()

    def reattach(self, state: dict, job: TrainingJob, extra_env: Mapping[str, str]) -> DockerJobHandle:
        """Take over a run another process started (a retry after its worker died, a deferral's end):
        its containers run on; their logs are followed from where the last reader stopped, and an
        embedded store is served again where the containers reach it."""
        secrets = secret_values(job)
        handle = DockerJobHandle.from_state(state, list(secrets.values()))
        handle.pending = dict(secrets)  # a value delivered later rewrites the file with them
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if state.get("relay") and tracking_uri and needs_relay(tracking_uri):
            log_file = handle.run_dir.with_suffix(".tracking-server.log")
            handle.relay = StoreServer(tracking_uri, log_file, handle.run_id, listen=tuple(state["relay"]))
            handle.relay.start()
        for replica in handle.containers:
            handle.follow(self.client.api, replica)
        self._renew_lease(handle)
        return handle

    def check_deferrable(self, extra_env: Mapping[str, str]) -> None:
        refuse_deferral_through_worker(extra_env, "the containers")

    def trigger(self, handle: DockerJobHandle, job: TrainingJob, timeout: float | None):
        from airflow_provider_dnntrain.triggers.docker import DockerJobTrigger

        handle.finish_reading(timeout=0)  # the trigger reads on from the cursors
        return DockerJobTrigger(
            state=handle.to_state(), secrets=list(secret_values(job).values()), docker_url=self.docker_url,
            lease_interval=self.lease_interval, timeout=timeout, grace_seconds=self.stop_grace_seconds,
        )  # fmt: skip

    def stream_logs(self, handle: DockerJobHandle, timeout: float) -> Iterable[LogLine]:
        return handle.drain(timeout)

    def tail(self, handle: DockerJobHandle, replica: str) -> list[str]:
        return list(handle.tails.get(replica, []))

    # -- ending -----------------------------------------------------------------------------------

    def stop(self, handle: DockerJobHandle, grace_seconds: float) -> None:
        """Stop every container (SIGTERM, SIGKILL after the grace), save the primary's outputs, then
        remove every container and the network of the run (raise naming any still there)."""
        if handle.stopped:
            return
        with ThreadPoolExecutor(max(1, len(handle.containers))) as pool:
            list(pool.map(lambda c: self._stop_container(c, grace_seconds), handle.containers.values()))
        handle.finish_reading(timeout=5)
        if not handle.cancelled:
            self._save_outputs(handle)
        handle.stopped = True
        if handle.relay is not None:
            handle.relay.close()
        left = remove_run(self.client.api, handle.run_id)
        if left:
            raise RuntimeError(f"run {handle.run_id}: still on the daemon after removal: {', '.join(left)}")

    def _stop_container(self, container: str, grace: float) -> None:
        try:
            self.client.api.stop(container, timeout=int(round(grace)))
        except Exception as error:  # gone already
            if getattr(error, "status_code", None) != 404:
                raise

    def cancel(self, handle: DockerJobHandle) -> None:
        """Ask the run's watchdog to end the run, and return: it stops every container (SIGKILL after
        the grace) and removes them and the network, whether or not this process is still there."""
        handle.cancelled = True
        if handle.watchdog:
            self._renew_lease(handle, "stop")

    def _save_outputs(self, handle: DockerJobHandle) -> None:
        chief = handle.containers.get(handle.plan.chief.name)
        if chief is None:  # never created
            return
        artifacts = handle.run_dir / "artifacts"
        artifacts.mkdir(exist_ok=True)
        try:
            for folder in ("outputs", "logs"):
                copy_out(self.client.api, chief, f"{specs.WORKDIR}/{folder}", artifacts)
            if handle.environment_record:
                (artifacts / "logs").mkdir(exist_ok=True)
                (artifacts / "logs" / ENVIRONMENT_RECORD).write_text(handle.environment_record)
            if handle.redactor:
                handle.redactor.redact_tree(artifacts)
        except Exception as error:
            handle.outputs_lost = f"{type(error).__name__}: {error}"
            log.warning("run %s: the chief's outputs were not copied: %s", handle.run_id, error)

    def collect_outputs(self, handle: DockerJobHandle) -> Path:
        lost = handle.outputs_lost
        return collected_artifacts(handle.run_dir, handle.run_id, lost, self.outputs_required)
