"""Kubernetes: every replica in a pod of its own, behind a per-run headless Service.

The cluster is reached through the cncf-kubernetes provider's ``KubernetesHook`` (its connection:
in-cluster, a kubeconfig file or inline kubeconfig, a context). A run's objects are owned by its
ConfigMap (which also carries the source snapshot): deleting it garbage-collects every other one, so
a stop - or a cancel from a task that is about to be killed - is one request. While the job runs,
one list call per poll (by the run's label) gives every pod's state; each pod's log is followed by
one stream of its own. The chief's outputs are copied out of its pod through ``exec`` into a sidecar
that keeps its working directory, as KubernetesPodOperator's XCom sidecar does.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import io
import json
import logging
import shutil
import socket
import tarfile
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from airflow_provider_dnntrain import inputs
from airflow_provider_dnntrain.launchers.base import (
    ENTRY_SCRIPT_VAR,
    LAUNCH_ID_VAR,
    PRIMARY_REPLICA_VAR,
    JobState,
    JobStatus,
    Launcher,
    LogLine,
)
from airflow_provider_dnntrain.launchers.kubernetes_files import default_image, run_bundle, ssh_files
from airflow_provider_dnntrain.launchers.kubernetes_inputs import (
    INPUTS_FOLDER,
    SOURCES_KEY,
    check_inputs,
    input_volumes,
    place_inputs,
)
from airflow_provider_dnntrain.launchers.kubernetes_job import (
    KubernetesJobHandle,
    cursors_patch,
    deleted_workload,
    main_container_started,
)
from airflow_provider_dnntrain.launchers.kubernetes_kubeflow import (
    KubeflowPlacement,
    check_kubeflow,
    kubeflow_kind,
    render_kubeflow_job,
)
from airflow_provider_dnntrain.launchers.kubernetes_manifests import (
    BOOTSTRAP,
    CURSORS_ANNOTATION,
    OUTPUTS_CONTAINER,
    SSH_PORT,
    Gang,
    PodPlacement,
    RunSettings,
    job_name,
    masked,
    outputs_host,
    pod_name,
    render_run,
    secret_data,
    ssh_nodes,
)
from airflow_provider_dnntrain.launchers.kubernetes_options import GangScheduler, PodOptions
from airflow_provider_dnntrain.launchers.local_logs import Redactor
from airflow_provider_dnntrain.launchers.ssh_tracking import (
    TrackingRelay,
    needs_relay,
    refuse_deferral_through_worker,
)
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan, render_plan

log = logging.getLogger(__name__)
_DELETE_WAIT_SECONDS = 60
_EXEC_TIMEOUT_SECONDS = 120
_CONNECTIONS = 1100  # log streams of the widest runs, and the calls
_CREATING_AT_ONCE = 16  # pods created in parallel: a wide run starts in round trips / 16
_SIGNED_URL_SECONDS = 6 * 3600  # how long pods may take to fetch an input, besides starting


class KubernetesLauncher(Launcher):
    """Run every replica as a pod on a Kubernetes cluster.

    Connection: ``kubernetes_conn_id`` (the cncf-kubernetes provider's), or ``in_cluster`` /
    ``config_file`` / ``cluster_context`` as ``KubernetesHook`` takes them. ``namespace``: default the
    connection's, else ``default``. Pods: ``image`` (default: the job environment's, else the project's
    training image for the framework and device), and KubernetesPodOperator's knobs by its names
    (``labels``, ``annotations``, ``node_selector``, ``affinity``, ``tolerations``, ``volumes``,
    ``volume_mounts``, ``service_account_name``, ``image_pull_secrets``, ``image_pull_policy``,
    ``security_context``, ``container_security_context``, ``container_resources``,
    ``priority_class_name``, ``schedulername``, ``init_containers``, ``env_vars``), with
    ``pod_template_file`` / ``full_pod_spec`` as a base and ``role_options`` per role (``{"ps": {...}}``).
    ``gang_scheduling``: ``kueue`` (with ``queue_name``), ``volcano`` or ``coscheduling``, so that all
    pods start together or none does.

    ``kubeflow=True``: the job goes to the cluster as a TFJob, PyTorchJob or (Horovod, with
    ``runner='mpirun'``) MPIJob (``kubeflow.org/v1``) that the Kubeflow training operator runs (it makes
    the pods); it is waited on, logged and cleaned up the same way, and the operator's verdict fails the
    run too.

    Tracking from pods: a tracking server the pods reach is passed on as it is; the embedded store
    is served to them by an ``mlflow server`` this task runs, listening on ``tracking_bind``, at
    ``tracking_address`` (``host:port`` where pods reach this worker; default: the connection's extra
    ``tracking_address``, else this worker's address towards the API server, on a free port).

    Inputs: each pod fetches the job's downloads itself, from URLs this worker resolves with the
    input's connection (signed ones for object stores), into ``inputs_cache_claim`` (a
    ReadWriteMany claim every run shares, so a node fetches an input once) or else the pod's own
    ``emptyDir``; ``pvc://<claim>/<path>`` inputs are that claim, mounted read-only.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubernetes_conn_id: str | None = "kubernetes_default",
        namespace: str | None = None,
        in_cluster: bool | None = None,
        config_file: str | None = None,
        cluster_context: str | None = None,
        python: str = "python",
        role_options: Mapping[str, PodOptions | Mapping[str, Any]] | None = None,
        pod_template_file: str | None = None,
        full_pod_spec: Any = None,
        gang_scheduling: GangScheduler | None = None,
        queue_name: str | None = None,
        startup_timeout_seconds: float = 120.0,
        poll_interval: float = 1.0,
        stop_grace_seconds: float = 10.0,
        work_root: str | None = None,
        tracking_address: str | None = None,
        tracking_bind: str = "0.0.0.0",
        kubeflow: bool = False,
        inputs_cache_claim: str | None = None,
        **pod_options: Any,
    ) -> None:
        self.kubernetes_conn_id = kubernetes_conn_id
        self.namespace = namespace
        self.in_cluster = in_cluster
        self.config_file = config_file
        self.cluster_context = cluster_context
        self.python = python
        try:
            self.pod_options = PodOptions(**pod_options)
            self.role_options = {
                role: o if isinstance(o, PodOptions) else PodOptions(**o)
                for role, o in (role_options or {}).items()
            }
        except Exception as error:  # pydantic names the field
            raise ValueError(f"kubernetes launcher: {error}") from None
        self.pod_template_file = pod_template_file
        self.full_pod_spec = full_pod_spec
        self.gang = Gang(gang_scheduling, queue_name) if gang_scheduling else None
        self.startup_timeout_seconds = startup_timeout_seconds
        self.poll_interval = poll_interval
        self.stop_grace_seconds = stop_grace_seconds
        self.work_root = Path(work_root) if work_root else None
        self.tracking_address = tracking_address
        self.tracking_bind = tracking_bind
        self.kubeflow = kubeflow
        self.inputs_cache_claim = inputs_cache_claim

    # -- the cluster ----------------------------------------------------------------------------

    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(
            conn_id=self.kubernetes_conn_id,
            in_cluster=self.in_cluster,
            config_file=self.config_file,
            cluster_context=self.cluster_context,
        )

    @cached_property
    def core(self):
        core = self.hook.core_v1_client
        # Every pod's log is one long-lived stream: room for them besides the calls (urllib3 would
        # otherwise warn, into the task log, on every connection past its default ten).
        with contextlib.suppress(AttributeError):
            core.api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] = _CONNECTIONS
        return core

    def _connection_extra(self, name: str):
        return self.hook.conn_extras.get(name) if self.kubernetes_conn_id else None

    def _namespace(self) -> str:
        if self.namespace is None:
            self.namespace = self.hook.get_namespace() or "default"
        return self.namespace

    # -- plan -----------------------------------------------------------------------------------

    def placement(self, run_id: str) -> PodPlacement:
        return PodPlacement(run_id)

    def interpreter(self, job: TrainingJob) -> str:
        return job.environment.python or self.python

    def validate(self, job: TrainingJob) -> None:
        if job.environment.has_packages:
            raise ValueError(
                "environment.pip_packages: Kubernetes replicas run their image as it is; build an image that "
                "has the packages (FROM dnntrain-torch:cpu, RUN pip install ...) and name it in "
                "environment.image"
            )
        if self.kubeflow:
            check_kubeflow(job)
        check_inputs(job)

    def inputs_folder(self, run_id: str) -> str:
        return INPUTS_FOLDER

    def plan(self, job: TrainingJob, run_id: str) -> JobPlan:
        return self._plan(job, run_id, self._namespace())

    def preview(self, job: TrainingJob, run_id: str) -> JobPlan:
        return self._plan(job, run_id, self.namespace or "default")

    def _plan(self, job: TrainingJob, run_id: str, namespace: str) -> JobPlan:
        self.validate(job)
        job = place_inputs(job)
        if self.kubeflow:
            kind = kubeflow_kind(job.framework, job.distribution.kind)
            placement: Any = KubeflowPlacement(run_id, namespace, kind)
        else:
            job, placement = _with_ssh_port(job), self.placement(run_id)
        return render_plan(job, run_id, placement, self.interpreter(job))

    def preview_objects(self, job: TrainingJob, run_id: str) -> list[dict]:
        """Every object a run would create, secrets masked and the bundle's files shown by size."""
        plan = self.preview(job, run_id)
        settings = self._settings(job, plan, self.namespace or "default", {})
        secrets = {name: "***" for name in job.environment.secrets}
        data = secret_data(secrets, {})
        if inputs.downloads(job):
            data[SOURCES_KEY] = "***"
        objects = render_run(plan, settings, run_bundle(check_source(job), plan, job.resume_from), data)
        if self.kubeflow:
            workload = self._workload(job, plan, settings, objects.owner_reference)
            objects = dataclasses.replace(objects, service=None, pods=[], pod_group=None, extra=[workload])
        return masked(objects)

    def _workload(self, job: TrainingJob, plan: JobPlan, settings: RunSettings, owner_ref: dict) -> dict:
        """The run's Kubeflow job."""
        kind = kubeflow_kind(job.framework, job.distribution.kind)
        return render_kubeflow_job(plan, settings, kind, owner_ref)

    def _settings(self, job: TrainingJob, plan: JobPlan, namespace: str, launch_env: Mapping[str, str]):
        volumes, mounts = input_volumes(job, job_name(plan.run_id), self.inputs_cache_claim)
        return RunSettings(
            namespace=namespace,
            image=job.environment.image or self.pod_options.image or default_image(job),
            python=self.interpreter(job),
            options=self.pod_options,
            role_options=self.role_options,
            launch_env=dict(launch_env),
            secret_names=sorted(job.environment.secrets),
            use_gpu=job.resources.use_gpu,
            cpu=job.resources.cpu,
            memory=job.resources.memory,
            grace_seconds=int(self.stop_grace_seconds),
            gang=self.gang,
            pod_template=self._pod_template(),
            input_volumes=volumes,
            input_mounts=mounts,
        )

    def _pod_template(self) -> dict | None:
        from airflow_provider_dnntrain.launchers.kubernetes_options import to_api_json

        if self.full_pod_spec is not None:
            return to_api_json(self.full_pod_spec)
        if self.pod_template_file:
            import yaml

            return yaml.safe_load(Path(self.pod_template_file).read_text())
        return None

    # -- submit ---------------------------------------------------------------------------------

    def submit(
        self,
        job: TrainingJob,
        plan: JobPlan,
        extra_env: Mapping[str, str],
        *,
        pending_env: Collection[str] = (),
    ) -> KubernetesJobHandle:
        source = check_source(job)
        namespace = self._namespace()
        run_dir = self.run_dir(plan.run_id)
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        run_dir.chmod(0o700)
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = {name: value.get_secret_value() for name, value in job.environment.secrets.items()}
        handle = KubernetesJobHandle(
            run_id=plan.run_id,
            plan=plan,
            job=job_name(plan.run_id),
            namespace=namespace,
            run_dir=run_dir,
            launch_id=uuid.uuid4().hex,
            redactor=Redactor(list(secrets.values())),
            awaiting=set(pending_env),
        )
        if self.kubeflow:
            kind = kubeflow_kind(job.framework, job.distribution.kind)
            handle.container = kind.container
            handle.workload = {"group": kind.group, "version": kind.version, "plural": kind.plural}
        self._remove_run(handle, wait=True)  # what an earlier submit of this run id left
        launch_env = {
            **extra_env,
            "PYTHONUNBUFFERED": "1",
            LAUNCH_ID_VAR: handle.launch_id,
            ENTRY_SCRIPT_VAR: job.entry_script,
            PRIMARY_REPLICA_VAR: plan.chief.name,
        }
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if tracking_uri and needs_relay(tracking_uri):
            handle.relay, launch_env["MLFLOW_TRACKING_URI"] = self._serve_tracking(tracking_uri, run_dir)
            handle.relay_uri = launch_env["MLFLOW_TRACKING_URI"]
        try:
            self._create_run(handle, job, plan, source, launch_env, secrets)
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        return handle

    def _create_run(self, handle, job, plan, source, launch_env, secrets) -> None:
        keys = ssh_files(handle.job) if ssh_nodes(plan) else {}
        data = secret_data(secrets, keys)
        if inputs.downloads(job):  # signed URLs and connection headers: credentials, so in the Secret
            data[SOURCES_KEY] = inputs.pod_sources(job, self.startup_timeout_seconds + _SIGNED_URL_SECONDS)
        bundle = run_bundle(source, plan, job.resume_from)
        settings = self._settings(job, plan, handle.namespace, launch_env)
        owner = render_run(plan, settings, bundle, data).owner
        handle.owner_uid = self.core.create_namespaced_config_map(handle.namespace, owner).metadata.uid
        objects = render_run(plan, settings, bundle, data, owner_uid=handle.owner_uid)
        self.core.create_namespaced_secret(handle.namespace, objects.secret)
        handle.launch_env = launch_env
        handle.settings = settings
        if handle.workload is not None:  # the training operator makes the pods and their Services
            handle.pod_manifests = [self._workload(job, plan, settings, objects.owner_reference)]
            if not handle.awaiting:
                self._create_pods(handle)
            return
        self.core.create_namespaced_service(handle.namespace, objects.service)
        if objects.pod_group is not None:
            group, version = objects.pod_group["apiVersion"].split("/")
            self.hook.custom_object_client.create_namespaced_custom_object(
                group, version, handle.namespace, "podgroups", objects.pod_group
            )
        handle.pod_manifests = objects.pods
        if not handle.awaiting:
            self._create_pods(handle)

    def _create_pods(self, handle: KubernetesJobHandle) -> None:
        """The pods, with every value they start with: the variables submit was told are pending are
        part of their environment (a pod's environment cannot change once it runs)."""
        pods = handle.pod_manifests
        settings = dataclasses.replace(handle.settings, launch_env={**handle.launch_env, **handle.provided})
        if handle.workload is not None:
            self._create_workload(handle, settings)
            return
        if handle.provided:
            pods = render_run(handle.plan, settings, {}, {}, owner_uid=handle.owner_uid).pods
        with ThreadPoolExecutor(max_workers=_CREATING_AT_ONCE) as pool:
            list(pool.map(lambda pod: self.core.create_namespaced_pod(handle.namespace, pod), pods))
        handle.pods_created_at = time.monotonic()

    def _create_workload(self, handle: KubernetesJobHandle, settings: RunSettings) -> None:
        from kubernetes.client.exceptions import ApiException

        workload = handle.pod_manifests[0]
        if handle.provided:
            reference = workload["metadata"]["ownerReferences"][0]
            kind = kubeflow_kind(handle.plan.framework, handle.plan.distribution)
            workload = render_kubeflow_job(handle.plan, settings, kind, reference)
        w = handle.workload
        try:
            self.hook.custom_object_client.create_namespaced_custom_object(
                w["group"], w["version"], handle.namespace, w["plural"], workload
            )
        except ApiException as error:
            if error.status == 404:
                raise RuntimeError(
                    f"kubeflow: the cluster serves no {workload['kind']} ({w['group']}/{w['version']} "
                    f"{w['plural']}): install the Kubeflow training operator, or run with kubeflow=False"
                ) from None
            raise
        handle.pods_created_at = time.monotonic()

    def _serve_tracking(self, tracking_uri: str, run_dir: Path) -> tuple[TrackingRelay, str]:
        """The embedded store, served to the pods by an ``mlflow server`` on this worker."""
        if urlsplit(tracking_uri).scheme.startswith("http"):
            raise ValueError(
                f"tracking_uri: {tracking_uri} listens on this worker's loopback, which pods cannot reach; "
                "let it listen on an address they reach, and name that one"
            )
        address = self.tracking_address or self._connection_extra("tracking_address")
        address = address or f"{self._address_towards_cluster()}:0"
        host, _, port = address.rpartition(":")
        relay = TrackingRelay(
            tracking_uri, run_dir.with_suffix(".tracking-server.log"), listen=(self.tracking_bind, int(port))
        )
        return relay, f"http://{host}:{relay.target[1]}"

    def _address_towards_cluster(self) -> str:
        """This worker's address on the route to the API server: where pods usually reach it."""
        server = urlsplit(self.hook.api_client.configuration.host)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((server.hostname, server.port or 443))
            address = probe.getsockname()[0]
        if address.startswith("127."):
            raise ValueError(
                "tracking: the job's tracking store is on this worker (the embedded store, or a server on "
                "its loopback) and the cluster's API server is reached over loopback, so no address of "
                "this worker is known to the pods; give tracking_uri=http://<server the pods reach>, or "
                "the launcher's tracking_address='<host>:<port>'"
            )
        return address

    def provide_env(self, handle: KubernetesJobHandle, values: Mapping[str, str]) -> None:
        if handle.relay is not None and "MLFLOW_RUN_ID" in values:
            handle.relay.start_server()
        if handle.pods_created_at is not None:  # a run taken over: its pods had them from the start
            return
        handle.provided.update(values)
        handle.awaiting -= set(values)
        if not handle.awaiting and not handle.cancelled:
            self._create_pods(handle)

    # -- surviving the task process -------------------------------------------------------------

    def state(self, handle: KubernetesJobHandle) -> dict:
        return handle.to_state()

    def reattach(self, state: dict, job: TrainingJob, extra_env: Mapping[str, str]) -> KubernetesJobHandle:
        """Take over a run another process started (a retry after its worker died, a deferral's end):
        its objects are found by name and checked by the owner's uid; pods not created yet are created
        once the pending values come; an embedded store is served again on the port the pods use."""
        from kubernetes.client.exceptions import ApiException

        secrets = [value.get_secret_value() for value in job.environment.secrets.values()]
        handle = KubernetesJobHandle.from_state(state, secrets)
        handle.settings = self._settings(job, handle.plan, handle.namespace, handle.launch_env)
        try:
            owner = self.core.read_namespaced_config_map(handle.job, handle.namespace)
        except ApiException as error:
            if error.status == 404:
                raise RuntimeError(f"run {handle.run_id}: its objects are gone from the cluster") from None
            raise
        if owner.metadata.uid != handle.owner_uid:
            raise RuntimeError(f"run {handle.run_id}: its owner was replaced by another launch")
        saved = (owner.metadata.annotations or {}).get(CURSORS_ANNOTATION)
        if saved:
            handle.take_cursors(json.loads(saved))
        if handle.pods_created_at is None and self._list_pods(handle):  # created after the state was kept
            handle.pods_created_at, handle.awaiting = time.monotonic(), set()
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if state.get("relay_port") and tracking_uri and needs_relay(tracking_uri):
            log_file = handle.run_dir.with_suffix(".tracking-server.log")
            handle.relay = TrackingRelay(
                tracking_uri, log_file, listen=(self.tracking_bind, state["relay_port"])
            )
        return handle

    def check_deferrable(self, extra_env: Mapping[str, str]) -> None:
        refuse_deferral_through_worker(extra_env, "the pods")

    def trigger(self, handle: KubernetesJobHandle, job: TrainingJob, timeout: float | None):
        from airflow_provider_dnntrain.triggers.kubernetes import KubernetesJobTrigger

        handle.finish_reading(timeout=0)  # the trigger reads on from the cursors
        return KubernetesJobTrigger(
            state=handle.to_state(),
            secrets=[value.get_secret_value() for value in job.environment.secrets.values()],
            connection=self._connection(),
            poll_interval=self.poll_interval,
            startup_timeout=self.startup_timeout_seconds,
            timeout=timeout,
        )

    def _connection(self) -> dict:
        """How ``KubernetesHook`` / ``AsyncKubernetesHook`` reach the cluster (for the trigger)."""
        return {
            "conn_id": self.kubernetes_conn_id,
            "in_cluster": self.in_cluster,
            "config_file": self.config_file,
            "cluster_context": self.cluster_context,
        }

    # -- observe --------------------------------------------------------------------------------

    def poll(self, handle: KubernetesJobHandle) -> JobStatus:
        if handle.cancelled:
            return JobStatus(JobState.CANCELLED, f"job {handle.run_id} was cancelled")
        if handle.pods_created_at is None or handle.status.state.finished:
            return handle.status
        if time.monotonic() - handle.last_poll < self.poll_interval:
            return handle.status
        handle.last_poll = time.monotonic()
        pods = self._list_pods(handle)
        for pod in pods:
            if main_container_started(pod, handle.container):
                handle.follow(self.core, pod.metadata.name)
        handle.status = handle.evaluate(pods, self.startup_timeout_seconds, self._read_workload(handle))
        if handle.cursors_due():
            self._save_cursors(handle)
        return handle.status

    def _save_cursors(self, handle: KubernetesJobHandle) -> None:
        """How far each pod's log was logged, on the run's owner: a try that takes the run over after
        this worker died repeats at most the lines of the last few seconds."""
        try:
            self.core.patch_namespaced_config_map(handle.job, handle.namespace, cursors_patch(handle))
        except Exception as error:  # the next save tries again; the job goes on
            log.debug("Run %s: could not save log cursors: %s", handle.run_id, error)

    def _read_workload(self, handle: KubernetesJobHandle) -> dict | None:
        from kubernetes.client.exceptions import ApiException

        if handle.workload is None:
            return None
        w = handle.workload
        try:
            return self.hook.custom_object_client.get_namespaced_custom_object(
                w["group"], w["version"], handle.namespace, w["plural"], handle.job
            )
        except ApiException as error:
            if error.status == 404:
                return deleted_workload()
            raise

    def _list_pods(self, handle: KubernetesJobHandle) -> list:
        return self.core.list_namespaced_pod(handle.namespace, label_selector=handle.selector).items

    def stream_logs(self, handle: KubernetesJobHandle, timeout: float) -> Iterable[LogLine]:
        if not handle.has_lines() and timeout > 0:
            time.sleep(min(timeout, max(0.0, handle.last_poll + self.poll_interval - time.monotonic())))
        return handle.take_lines()

    def tail(self, handle: KubernetesJobHandle, replica: str) -> list[str]:
        return list(handle.tails.get(replica, []))

    # -- stop -----------------------------------------------------------------------------------

    def cancel(self, handle: KubernetesJobHandle) -> None:
        """One request, in the background: the owner goes, and the cluster deletes the rest."""
        handle.cancelled = True
        threading.Thread(target=self._remove_run, args=(handle,), daemon=True).start()

    def stop(self, handle: KubernetesJobHandle, grace_seconds: float) -> None:
        """Save the chief's outputs, then delete every object of the run and wait until its pods are
        gone (raise naming any still there)."""
        if handle.stopped:
            return
        if handle.pods_created_at is not None and not handle.cancelled:
            self._save_outputs(handle)
        handle.stopped = True
        if handle.workload is not None:  # first, or its operator would make the pods again
            self._delete_workload(handle)
        self.core.delete_collection_namespaced_pod(
            handle.namespace,
            label_selector=handle.selector,
            grace_period_seconds=int(grace_seconds),
        )
        left = self._wait_until_gone(handle, grace_seconds + _DELETE_WAIT_SECONDS)
        handle.finish_reading(timeout=5)
        self._remove_run(handle, wait=False)
        if handle.relay is not None:
            handle.relay.close()
        if left:
            raise RuntimeError(f"run {handle.run_id}: pods still there after deletion: {', '.join(left)}")

    def _delete_workload(self, handle: KubernetesJobHandle) -> None:
        from kubernetes.client.exceptions import ApiException

        w = handle.workload
        try:
            self.hook.custom_object_client.delete_namespaced_custom_object(
                w["group"], w["version"], handle.namespace, w["plural"], handle.job
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def _wait_until_gone(self, handle: KubernetesJobHandle, timeout: float) -> list[str]:
        deadline = time.monotonic() + timeout
        while left := [p.metadata.name for p in self._list_pods(handle)]:
            if time.monotonic() > deadline:
                return left
            time.sleep(0.25)
        return []

    def _remove_run(self, handle: KubernetesJobHandle, wait: bool = False) -> None:
        """Delete the run's owner: the cluster's garbage collector deletes everything it owns."""
        from kubernetes.client import V1DeleteOptions
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_config_map(
                handle.job, handle.namespace, body=V1DeleteOptions(propagation_policy="Background")
            )
        except ApiException as error:
            if error.status != 404:
                raise
        if wait and self._wait_until_gone(handle, self.stop_grace_seconds + _DELETE_WAIT_SECONDS):
            raise RuntimeError(f"run {handle.run_id}: the pods of an earlier launch are still there")

    # -- outputs --------------------------------------------------------------------------------

    def _save_outputs(self, handle: KubernetesJobHandle) -> None:
        """The chief's ``./outputs`` and ``./logs``, through ``exec`` into the pod's outputs sidecar."""
        chief = pod_name(outputs_host(handle.plan))
        target = handle.run_dir / "artifacts"
        try:
            packed = self._exec(handle, chief, [handle.settings.python, BOOTSTRAP, "pack"])
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed)), mode="r:gz") as tar:
                tar.extractall(target, filter="data")
        except Exception as error:
            log.warning("Run %s: could not copy the outputs out of pod %s: %s", handle.run_id, chief, error)

    def _exec(self, handle: KubernetesJobHandle, pod: str, command: list[str]) -> str:
        from kubernetes.client import CoreV1Api
        from kubernetes.stream import stream

        # A client of its own: ``stream`` swaps its client's transport for a websocket while it runs.
        core = CoreV1Api(self.hook.get_conn())
        client = stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            handle.namespace,
            container=OUTPUTS_CONTAINER,
            command=command,
            stderr=True,
            stdin=False,
            stdout=True,
            tty=False,
            _preload_content=False,
        )
        try:
            client.run_forever(timeout=_EXEC_TIMEOUT_SECONDS)
            if client.returncode not in (0, None):
                raise RuntimeError(f"{command[-1]} exited {client.returncode}: {client.read_stderr()}")
            return client.read_stdout()
        finally:
            client.close()

    def collect_outputs(self, handle: KubernetesJobHandle) -> Path:
        artifacts = handle.run_dir / "artifacts"
        for sub in ("outputs", "logs"):
            (artifacts / sub).mkdir(parents=True, exist_ok=True)
        return artifacts


def _with_ssh_port(job: TrainingJob) -> TrainingJob:
    """Horovod's nodes run sshd on the run's port (unprivileged, so it runs as any user)."""
    dist = job.distribution
    if getattr(dist, "kind", "") == "horovod" and dist.ssh_port is None:
        return job.model_copy(update={"distribution": dist.model_copy(update={"ssh_port": SSH_PORT})})
    return job
