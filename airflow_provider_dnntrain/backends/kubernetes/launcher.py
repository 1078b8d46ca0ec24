"""Kubernetes: every replica in a pod of its own, behind a per-run headless Service.

The cluster is reached through the cncf-kubernetes provider's ``KubernetesHook`` (its connection:
in-cluster, a kubeconfig file or inline kubeconfig, a context). A run's objects are owned by its
ConfigMap (which also carries the source snapshot): deleting it garbage-collects every other one, so
a stop - or a cancel from a task that is about to be killed - is one request. While the job runs,
one list call per poll (by the run's label) gives every pod's state; each pod's log is followed by
one stream of its own (``logs.py``). The chief's outputs are copied out of its pod through ``exec``
into a sidecar that keeps its working directory, as KubernetesPodOperator's XCom sidecar does.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Collection, Iterable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.base import (
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    collected_artifacts,
    secret_values,
)
from airflow_provider_dnntrain.backends.common.environment_images import ImageBuilding
from airflow_provider_dnntrain.backends.common.lines import Redactor
from airflow_provider_dnntrain.backends.common.replica import launch_env
from airflow_provider_dnntrain.backends.common.tracking_server import (
    StoreServer,
    needs_relay,
    refuse_deferral_through_worker,
)
from airflow_provider_dnntrain.backends.kubernetes import creation
from airflow_provider_dnntrain.backends.kubernetes.api import ApiPatience
from airflow_provider_dnntrain.backends.kubernetes.cluster import DELETE_WAIT_SECONDS, Cluster
from airflow_provider_dnntrain.backends.kubernetes.inputs import INPUTS_FOLDER, check_inputs
from airflow_provider_dnntrain.backends.kubernetes.job import KubernetesJobHandle
from airflow_provider_dnntrain.backends.kubernetes.kubeflow import check_kubeflow, kubeflow_run_fields
from airflow_provider_dnntrain.backends.kubernetes.manifests import RunSettings, job_name
from airflow_provider_dnntrain.backends.kubernetes.options import GangScheduler, PodOptions
from airflow_provider_dnntrain.backends.kubernetes.outputs import save_outputs
from airflow_provider_dnntrain.backends.kubernetes.pending import PodTimeouts
from airflow_provider_dnntrain.backends.kubernetes.planning import PodPlacement, render_pod_plan
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun
from airflow_provider_dnntrain.backends.kubernetes.settings import PodDefaults
from airflow_provider_dnntrain.backends.kubernetes.tracking import serve_store, serve_store_again
from airflow_provider_dnntrain.source import check_source
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)
_DRAIN_SECONDS = 10.0  # for the logs of ended containers to be read to their end


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

    ``pip_packages``: an image built by the daemon at ``docker_url``, pushed to ``image_registry`` or
    ``docker_conn_id``'s registry (``common/environment_images.py``), pulled with a Secret of the run
    holding the registry's credentials (besides ``image_pull_secrets``).

    ``kubeflow=True``: the job goes to the cluster as a TFJob, PyTorchJob or (Horovod, with
    ``runner='mpirun'``) MPIJob (``kubeflow.org/v1``) that the Kubeflow training operator runs (it makes
    the pods); it is waited on, logged and cleaned up the same way, and the operator's verdict fails the
    run too.

    Tracking from pods: a tracking server the pods reach is passed on as it is; the embedded store
    is served to them by an MLflow server this task runs, listening on ``tracking_bind``, at
    ``tracking_address`` (``host:port`` where pods reach this worker; default: the connection's extra
    ``tracking_address``, else this worker's address towards the API server, on a free port).

    Inputs: each pod fetches the job's downloads itself, from URLs this worker resolves with the
    input's connection (signed ones for object stores), into ``inputs_cache_claim`` (a
    ReadWriteMany claim every run shares, so a node fetches an input once) or else the pod's own
    ``emptyDir``; ``pvc://<claim>/<path>`` inputs are that claim, mounted read-only.

    Real clusters: API calls have ``api_request_timeout`` and are retried for ``api_unavailable_timeout``
    (``api.py``); ``schedule_timeout``, ``startup_timeout_seconds`` and ``image_pull_timeout`` bound
    waiting (``pending.py``); pods end themselves once the run's lease lapsed for ``orphan_timeout``;
    outputs that cannot be copied fail the run unless ``outputs_required=False``.
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
        schedule_timeout: float | None = None,
        image_pull_timeout: float = 300.0,
        orphan_timeout: float | None = 300.0,
        poll_interval: float = 1.0,
        stop_grace_seconds: float = 10.0,
        work_root: str | None = None,
        tracking_address: str | None = None,
        tracking_bind: str = "0.0.0.0",
        kubeflow: bool = False,
        inputs_cache_claim: str | None = None,
        outputs_required: bool = True,
        api_request_timeout: float = 30.0,
        api_unavailable_timeout: float = 600.0,
        image_registry: str | None = None,
        docker_conn_id: str | None = None,
        docker_url: str | None = None,
        **pod_options: Any,
    ) -> None:
        self.kubernetes_conn_id = kubernetes_conn_id
        self.namespace = namespace
        self.in_cluster, self.config_file, self.cluster_context = in_cluster, config_file, cluster_context
        self.pods = PodDefaults.from_arguments(
            python=python,
            role_options=role_options,
            pod_template_file=pod_template_file,
            full_pod_spec=full_pod_spec,
            gang_scheduling=gang_scheduling,
            queue_name=queue_name,
            inputs_cache_claim=inputs_cache_claim,
            pod_options=pod_options,
            building=ImageBuilding.pushing(docker_url, image_registry, docker_conn_id),
        )
        self.startup_timeout_seconds = startup_timeout_seconds
        self.schedule_timeout = schedule_timeout
        self.image_pull_timeout = image_pull_timeout
        self.orphan_timeout = orphan_timeout
        self.poll_interval = poll_interval
        self.stop_grace_seconds = stop_grace_seconds
        self.work_root = Path(work_root) if work_root else None
        self.tracking_address, self.tracking_bind = tracking_address, tracking_bind
        self.kubeflow = kubeflow
        self.outputs_required = outputs_required
        self.api = ApiPatience(api_request_timeout, api_unavailable_timeout)

    # -- the cluster ----------------------------------------------------------------------------

    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(**self._connection())

    def _connection(self) -> dict:
        """How ``KubernetesHook`` here, and ``AsyncKubernetesHook`` on the triggerer, reach the cluster."""
        return {
            "conn_id": self.kubernetes_conn_id,
            "in_cluster": self.in_cluster,
            "config_file": self.config_file,
            "cluster_context": self.cluster_context,
        }

    @cached_property
    def cluster(self) -> Cluster:
        return Cluster(self.hook, self.api)

    @property
    def timeouts(self) -> PodTimeouts:
        return PodTimeouts(
            self.startup_timeout_seconds,
            self.schedule_timeout,
            self.image_pull_timeout,
            queued=self.pods.gang is not None,
            orphan=self.orphan_timeout,
        )

    @property
    def core(self):
        return self.cluster.core

    def _namespace(self) -> str:
        if self.namespace is None:
            self.namespace = self.hook.get_namespace() or "default"
        return self.namespace

    # -- plan -----------------------------------------------------------------------------------

    def placement(self, run_id: str) -> PodPlacement:
        return PodPlacement(run_id)

    def interpreter(self, job: TrainingJob) -> str:
        return self.pods.interpreter(job)

    def validate(self, job: TrainingJob) -> None:
        self.pods.check_environment(job)
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
        return render_pod_plan(job, run_id, namespace, self.interpreter(job), self.kubeflow)

    def preview_objects(self, job: TrainingJob, run_id: str) -> list[dict]:
        """Every object a run would create, secrets masked and the bundle's files shown by size."""
        plan = self.preview(job, run_id)
        settings = self._settings(job, plan, self.namespace or "default", {})
        return creation.preview(job, plan, settings, check_source(job), self.kubeflow)

    def _settings(
        self,
        job: TrainingJob,
        plan: JobPlan,
        namespace: str,
        launch_env: Mapping[str, str],
        time_limit: float | None = None,
    ) -> RunSettings:
        grace, orphan_timeout = self.stop_grace_seconds, self.orphan_timeout
        return self.pods.run_settings(job, plan, namespace, launch_env, grace, orphan_timeout, time_limit)

    # -- submit ---------------------------------------------------------------------------------

    def submit(
        self,
        job: TrainingJob,
        plan: JobPlan,
        extra_env: Mapping[str, str],
        *,
        pending_env: Collection[str] = (),
        time_limit: float | None = None,
    ) -> KubernetesJobHandle:
        source = check_source(job)
        self.pods.build_image(job)
        run_dir = self.fresh_run_dir(plan.run_id)
        (run_dir / "plan.json").write_text(plan.to_json())
        secrets = secret_values(job)
        run = KubernetesRun(
            run_id=plan.run_id,
            plan=plan,
            job=job_name(plan.run_id),
            namespace=self._namespace(),
            run_dir=run_dir,
            launch_id=uuid.uuid4().hex,
            awaiting=set(pending_env),
            **(kubeflow_run_fields(job) if self.kubeflow else {}),
        )
        handle = KubernetesJobHandle(run=run, redactor=Redactor(list(secrets.values())))
        self._remove_run(handle, wait=True)  # what an earlier submit of this run id left
        run.launch_env = {**extra_env, **launch_env(run.launch_id, job.entry_script, plan.chief.name)}
        tracking_uri = extra_env.get("MLFLOW_TRACKING_URI")
        if tracking_uri and needs_relay(tracking_uri):
            handle.relay, run.relay_uri = self._serve_tracking(tracking_uri, run_dir, run.run_id)
            run.launch_env["MLFLOW_TRACKING_URI"], run.relay_port = run.relay_uri, handle.relay.target[1]
        try:
            handle.settings = self._settings(job, plan, run.namespace, run.launch_env, time_limit)
            startup, pull_config = self.startup_timeout_seconds, self.pods.pull_config(job)
            creation.create_run(self.cluster, handle, job, source, secrets, startup, pull_config)
        except BaseException:
            self.stop(handle, grace_seconds=0)
            raise
        return handle

    def _serve_tracking(self, tracking_uri: str, run_dir: Path, run_id: str) -> tuple[StoreServer, str]:
        """The embedded store, served to the pods by an MLflow server on this worker."""
        extra = self.hook.conn_extras.get("tracking_address") if self.kubernetes_conn_id else None
        address = self.tracking_address or extra
        api_server = "" if address else self.hook.api_client.configuration.host
        return serve_store(tracking_uri, run_dir, run_id, address, self.tracking_bind, api_server)

    def provide_env(self, handle: KubernetesJobHandle, values: Mapping[str, str]) -> None:
        if handle.relay is not None and "MLFLOW_RUN_ID" in values:
            handle.relay.start()
        if handle.watch.created_at is not None:  # a run taken over: its pods had them from the start
            return
        handle.provided.update(values)
        handle.run.awaiting -= set(values)
        if not handle.run.awaiting and not handle.cancelled:
            creation.create_pods(self.cluster, handle)

    # -- surviving the task process -------------------------------------------------------------

    def state(self, handle: KubernetesJobHandle) -> dict:
        return handle.to_state()

    def reattach(self, state: dict, job: TrainingJob, extra_env: Mapping[str, str]) -> KubernetesJobHandle:
        """Take over a run another process started (a retry after its worker died, a deferral's end):
        its objects are found by name and checked by the owner's uid; pods not created yet are created
        once the pending values come; an embedded store is served again on the port the pods use."""
        handle = KubernetesJobHandle.from_state(state, list(secret_values(job).values()))
        run = handle.run
        handle.settings = self._settings(job, run.plan, run.namespace, run.launch_env)
        handle.take_saved_cursors(self.cluster.owner_of(run))
        if handle.watch.created_at is None and self.cluster.list_pods(run):  # made after the state was kept
            handle.watch.created_at, run.awaiting = time.monotonic(), set()
        handle.relay = serve_store_again(extra_env.get("MLFLOW_TRACKING_URI"), run, self.tracking_bind)
        run.relay_port = run.relay_port if handle.relay is not None else None
        return handle

    def check_deferrable(self, extra_env: Mapping[str, str]) -> None:
        refuse_deferral_through_worker(extra_env, "the pods")

    def trigger(self, handle: KubernetesJobHandle, job: TrainingJob, timeout: float | None):
        from airflow_provider_dnntrain.triggers.kubernetes import KubernetesJobTrigger

        handle.finish_reading(timeout=0)  # the trigger reads on from the cursors
        return KubernetesJobTrigger(
            state=handle.to_state(),
            secrets=list(secret_values(job).values()),
            connection=self._connection(),
            poll_interval=self.poll_interval,
            startup_timeout=self.startup_timeout_seconds,
            timeouts=self.timeouts.arguments(),
            timeout=timeout,
            api=self.api.arguments(),
        )

    # -- observe --------------------------------------------------------------------------------

    def poll(self, handle: KubernetesJobHandle) -> JobStatus:
        if handle.cancelled:
            return JobStatus(JobState.CANCELLED, f"job {handle.run_id} was cancelled")
        if handle.watch.created_at is None or handle.status.state.finished:
            return handle.status
        if time.monotonic() - handle.last_poll < self.poll_interval:
            return handle.status
        handle.last_poll = time.monotonic()
        handle.status = handle.observe(self.cluster, self.timeouts, self.pods.gang)
        return handle.status

    def stream_logs(self, handle: KubernetesJobHandle, timeout: float) -> Iterable[LogLine]:
        if not handle.logs.has_lines() and timeout > 0:
            time.sleep(min(timeout, max(0.0, handle.last_poll + self.poll_interval - time.monotonic())))
        return handle.logs.take_lines()

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
        handle.finish_reading_ended(timeout=_DRAIN_SECONDS)  # before their pods go
        if handle.watch.created_at is not None and not handle.cancelled:
            self._save_outputs(handle)
        handle.stopped = True
        left = self.cluster.delete_run_pods(handle.run, grace_seconds)
        handle.finish_reading(timeout=5)
        self._remove_run(handle, wait=False)
        if handle.relay is not None:
            handle.relay.close()
        if left:
            raise RuntimeError(f"run {handle.run_id}: pods still there after deletion: {', '.join(left)}")

    def _remove_run(self, handle: KubernetesJobHandle, wait: bool = False) -> None:
        """Delete the run's owner: the cluster's garbage collector deletes everything it owns."""
        self.cluster.delete_owner(handle.run)
        if wait and self.cluster.wait_until_gone(handle.run, self.stop_grace_seconds + DELETE_WAIT_SECONDS):
            raise RuntimeError(f"run {handle.run_id}: the pods of an earlier launch are still there")

    # -- outputs --------------------------------------------------------------------------------

    def _save_outputs(self, handle: KubernetesJobHandle) -> None:
        save_outputs(self.cluster, handle)

    def collect_outputs(self, handle: KubernetesJobHandle) -> Path:
        lost = handle.outputs_lost
        return collected_artifacts(handle.run.run_dir, handle.run_id, lost, self.outputs_required)
