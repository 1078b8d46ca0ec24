"""The Kubernetes launcher's deferrable wait: on the triggerer, one list of the run's pods (by label)
per interval for the whole job, each pod's log followed by the backend's own follower, every line into
the task log, and an event once the job has finished by gang semantics or failed."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_dnntrain.backends.base import JobState, JobStatus
from airflow_provider_dnntrain.backends.kubernetes.api import ApiPatience
from airflow_provider_dnntrain.backends.kubernetes.cluster import lease_patch, scaled_up
from airflow_provider_dnntrain.backends.kubernetes.job import KubernetesJobHandle
from airflow_provider_dnntrain.backends.kubernetes.logs import follow_on_loop
from airflow_provider_dnntrain.backends.kubernetes.pending import PodTimeouts
from airflow_provider_dnntrain.backends.kubernetes.status import (
    deleted_workload,
    main_container_started,
    pods_to_ask_about,
)
from airflow_provider_dnntrain.triggers import job_deadline, job_event, past_deadline, serialized

_SAVE_CURSORS_SECONDS = 10
_DRAIN_SECONDS = 10

# What re-creates the trigger on any triggerer: its arguments, serialized.
ARGUMENTS = (
    "state", "secrets", "connection", "poll_interval", "startup_timeout", "timeout", "deadline", "api",
    "timeouts",
)  # fmt: skip


class KubernetesJobTrigger(BaseTrigger):
    """Watches a Kubernetes run through the cncf-kubernetes provider's ``AsyncKubernetesHook``."""

    def __init__(
        self,
        *,
        state: dict[str, Any],
        secrets: list[str],
        connection: dict[str, Any],
        poll_interval: float,
        startup_timeout: float,
        timeout: float | None = None,
        deadline: float | None = None,
        api: dict[str, float] | None = None,
        timeouts: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.state = state
        self.secrets = secrets
        self.connection = connection
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.timeout = timeout
        self.deadline = job_deadline(timeout, deadline)
        self.api = api or {}  # ApiPatience's arguments: request_timeout, unavailable_timeout
        self.patience = ApiPatience(**self.api)
        self.timeouts = timeouts or {"startup": startup_timeout}  # PodTimeouts' arguments
        self.pod_timeouts = PodTimeouts(**self.timeouts)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return serialized(self, *ARGUMENTS)

    def _hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(**self.connection)

    async def on_kill(self) -> None:
        """The task was marked failed or success, or cleared, while deferred: delete the run's owner
        (the cluster deletes every pod, the Service and the Secret with it)."""
        from kubernetes_asyncio.client import CoreV1Api, V1DeleteOptions

        run = KubernetesJobHandle.from_state(self.state, self.secrets).run
        async with self._hook().get_conn() as api:
            with contextlib.suppress(Exception):
                await self.patience.acall(
                    "delete the run's configmap",
                    CoreV1Api(api).delete_namespaced_config_map,
                    run.job, run.namespace, body=V1DeleteOptions(propagation_policy="Background"),
                )  # fmt: skip

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from kubernetes_asyncio.client import CoreV1Api

        handle = KubernetesJobHandle.from_state(self.state, self.secrets)
        handle.watch.created_at = time.monotonic()
        readers: dict[str, asyncio.Task] = {}
        async with self._hook().get_conn() as api:
            core = CoreV1Api(api)
            await self._resume_cursors(core, handle)
            try:
                status = await self._watch(core, handle, readers)
                if readers:  # the readers of ended pods reach the end of their logs; servers are cut
                    await asyncio.wait(list(readers.values()), timeout=_DRAIN_SECONDS)
                self._log_lines(handle)
                yield TriggerEvent(job_event(handle, status))
            except asyncio.CancelledError:
                # The triggerer is stopping (or the task was ended): the run's owner keeps how far
                # this trigger logged, so that whoever takes the job over logs no line twice.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._save_cursors(core, handle), _SAVE_CURSORS_SECONDS)
                raise
            finally:
                for reader in readers.values():
                    reader.cancel()

    async def _watch(self, core, handle: KubernetesJobHandle, readers: dict) -> JobStatus:
        run = handle.run
        while True:
            try:
                listed = await self.patience.acall(
                    "list pods", core.list_namespaced_pod, run.namespace, label_selector=run.selector
                )
                pods = listed.items
                for pod in pods:
                    name = pod.metadata.name
                    if name not in readers and main_container_started(pod, run.container):
                        follower = handle.logs.follower(name, handle.ended)
                        then = lambda: self._log_lines(handle)  # noqa: E731 - saved cursors never run ahead
                        reader = follow_on_loop(core, follower, then, self.patience.request_timeout)
                        readers[name] = asyncio.create_task(reader)
                await self._ask_about_scale_ups(core, handle, pods)
                workload = await self._read_workload(core.api_client, handle)
                status = handle.evaluate(pods, self.pod_timeouts, workload)
                if note := handle.watch.note_due(pods, None):
                    self.log.info("Run %s: %s", run.run_id, note)
            except Exception as error:  # the task still has to stop the job: hand it back
                status = JobStatus(JobState.FAILED, f"job {run.run_id}: {type(error).__name__}: {error}")
            self._log_lines(handle)
            if handle.logs.cursors_due():  # a triggerer that dies outright repeats at most a few seconds
                with contextlib.suppress(Exception):
                    await self._save_cursors(core, handle)
            if handle.lease_due(self.pod_timeouts):  # the pods end themselves if this stops
                with contextlib.suppress(Exception):
                    await core.patch_namespaced_config_map(
                        run.job, run.namespace, lease_patch(), _request_timeout=self.patience.timeout
                    )
            status = past_deadline(status, run.run_id, self.timeout, self.deadline)
            if status.state.finished:
                return status
            await asyncio.sleep(self.poll_interval)

    def _log_lines(self, handle: KubernetesJobHandle) -> None:
        """Into the task log as they are taken: what is handed out is what the saved cursors count."""
        for line in handle.logs.take_lines():
            self.log.info("%s", line)

    async def _resume_cursors(self, core, handle: KubernetesJobHandle) -> None:
        """Start from where an earlier watcher of the run (a trigger on a stopped triggerer) got to."""
        run = handle.run
        with contextlib.suppress(Exception):
            owner = await self.patience.acall(
                "read the run's configmap", core.read_namespaced_config_map, run.job, run.namespace
            )
            handle.take_saved_cursors(owner)

    async def _ask_about_scale_ups(self, core, handle: KubernetesJobHandle, pods: list) -> None:
        """Pods past their bound to be scheduled wait on if the cluster autoscaler is adding a node."""
        for pod in pods_to_ask_about(handle.watch, pods, self.pod_timeouts):
            try:
                events = await self.patience.acall(
                    f"list events of pod {pod}", core.list_namespaced_event, handle.run.namespace,
                    field_selector=f"involvedObject.name={pod}",
                )  # fmt: skip
            except Exception as error:
                if getattr(error, "status", None) != 403:
                    raise
                continue
            if scaled_up(events.items):
                handle.watch.scaling_up.add(pod)

    async def _read_workload(self, api, handle: KubernetesJobHandle) -> dict | None:
        """The run's Kubeflow job as the API has it (its status: the training operator's verdict)."""
        run = handle.run
        if run.workload is None:
            return None
        from kubernetes_asyncio.client import CustomObjectsApi

        w = run.workload
        try:
            return await self.patience.acall(
                f"read {w['plural']} {run.job}",
                CustomObjectsApi(api).get_namespaced_custom_object,
                w["group"], w["version"], run.namespace, w["plural"], run.job,
            )  # fmt: skip
        except Exception as error:
            if getattr(error, "status", None) == 404:
                return deleted_workload()
            raise

    async def _save_cursors(self, core, handle: KubernetesJobHandle) -> None:
        run = handle.run
        await self.patience.acall(
            "patch the run's configmap",
            core.patch_namespaced_config_map, run.job, run.namespace, handle.cursors_patch(),
        )  # fmt: skip
