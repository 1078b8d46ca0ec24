"""The Kubernetes launcher's deferrable wait: on the triggerer, one list of the run's pods (by label)
per interval for the whole job, one follow stream per pod for its log, every line into the task log,
and an event once the job has finished by gang semantics or failed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_dnntrain.launchers.base import JobState, JobStatus
from airflow_provider_dnntrain.launchers.kubernetes_job import (
    KubernetesJobHandle,
    cursors_patch,
    deleted_workload,
    main_container_started,
)
from airflow_provider_dnntrain.launchers.kubernetes_manifests import CURSORS_ANNOTATION
from airflow_provider_dnntrain.triggers import job_deadline, job_event, past_deadline

_SAVE_CURSORS_SECONDS = 10
_DRAIN_SECONDS = 10


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
    ) -> None:
        super().__init__()
        self.state = state
        self.secrets = secrets
        self.connection = connection
        self.poll_interval = poll_interval
        self.startup_timeout = startup_timeout
        self.timeout = timeout
        self.deadline = job_deadline(timeout, deadline)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return (
            f"{type(self).__module__}.{type(self).__qualname__}",
            {
                "state": self.state,
                "secrets": self.secrets,
                "connection": self.connection,
                "poll_interval": self.poll_interval,
                "startup_timeout": self.startup_timeout,
                "timeout": self.timeout,
                "deadline": self.deadline,
            },
        )

    def _hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook

        return AsyncKubernetesHook(**self.connection)

    async def on_kill(self) -> None:
        """The task was marked failed or success, or cleared, while deferred: delete the run's owner
        (the cluster deletes every pod, the Service and the Secret with it)."""
        from kubernetes_asyncio.client import CoreV1Api, V1DeleteOptions

        handle = KubernetesJobHandle.from_state(self.state, self.secrets)
        async with self._hook().get_conn() as api:
            with contextlib.suppress(Exception):
                await CoreV1Api(api).delete_namespaced_config_map(
                    handle.job, handle.namespace, body=V1DeleteOptions(propagation_policy="Background")
                )

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from kubernetes_asyncio.client import CoreV1Api

        handle = KubernetesJobHandle.from_state(self.state, self.secrets)
        handle.pods_created_at = time.monotonic()
        readers: dict[str, asyncio.Task] = {}
        async with self._hook().get_conn() as api:
            core = CoreV1Api(api)
            await _resume_cursors(core, handle)
            try:
                status = await self._watch(core, handle, readers)
                await self._drain(readers)
                for line in handle.take_lines():
                    self.log.info("%s", line)
                yield TriggerEvent(job_event(handle, status))
            except asyncio.CancelledError:
                # The triggerer is stopping (or the task was ended): the run's owner keeps how far
                # this trigger logged, so that whoever takes the job over logs no line twice.
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(_save_cursors(core, handle), _SAVE_CURSORS_SECONDS)
                raise
            finally:
                for reader in readers.values():
                    reader.cancel()

    async def _watch(self, core, handle: KubernetesJobHandle, readers: dict) -> JobStatus:
        selector = handle.selector
        while True:
            try:
                pods = (await core.list_namespaced_pod(handle.namespace, label_selector=selector)).items
                for pod in pods:
                    name = pod.metadata.name
                    if name not in readers and main_container_started(pod, handle.container):
                        readers[name] = asyncio.create_task(self._follow(core, handle, name))
                workload = await _read_workload(core.api_client, handle)
                status = handle.evaluate(pods, self.startup_timeout, workload)
            except Exception as error:  # the task still has to stop the job: hand it back
                status = JobStatus(JobState.FAILED, f"job {handle.run_id}: {type(error).__name__}: {error}")
            for line in handle.take_lines():
                self.log.info("%s", line)
            if handle.cursors_due():  # a triggerer that dies outright repeats at most a few seconds
                with contextlib.suppress(Exception):
                    await _save_cursors(core, handle)
            status = past_deadline(status, handle.run_id, self.timeout, self.deadline)
            if status.state.finished:
                return status
            await asyncio.sleep(self.poll_interval)

    async def _follow(self, core, handle: KubernetesJobHandle, pod: str) -> None:
        """One pod's log, from its cursor, opened again if the stream ends before the container."""
        cursor = handle.cursor_of(pod)
        replica = handle.replica_of(pod)
        while True:
            cursor.resume()
            kwargs: dict[str, Any] = {"follow": True, "timestamps": True, "container": handle.container}
            if (since := cursor.since_seconds()) is not None:
                kwargs["since_seconds"] = since
            with contextlib.suppress(Exception):
                response = await core.read_namespaced_pod_log(
                    pod, handle.namespace, _preload_content=False, **kwargs
                )
                async with response:
                    async for raw in response.content:
                        handle.take_raw([raw.rstrip(b"\n")], cursor, replica)
                        for line in handle.take_lines():  # logged as taken: saved cursors never run ahead
                            self.log.info("%s", line)
            if handle.exit_codes.get(replica) is not None:
                return
            await asyncio.sleep(0.5)

    async def _drain(self, readers: dict[str, asyncio.Task]) -> None:
        """Let the readers of ended pods reach the end of their logs; the rest (servers) are cut."""
        if readers:
            await asyncio.wait(list(readers.values()), timeout=_DRAIN_SECONDS)


async def _resume_cursors(core, handle: KubernetesJobHandle) -> None:
    """Start from where an earlier watcher of the run (a trigger on a stopped triggerer) got to."""
    with contextlib.suppress(Exception):
        owner = await core.read_namespaced_config_map(handle.job, handle.namespace)
        saved = (owner.metadata.annotations or {}).get(CURSORS_ANNOTATION)
        if saved:
            handle.take_cursors(json.loads(saved))


async def _read_workload(api, handle: KubernetesJobHandle) -> dict | None:
    """The run's Kubeflow job as the API has it (its status: the training operator's verdict)."""
    if handle.workload is None:
        return None
    from kubernetes_asyncio.client import CustomObjectsApi
    from kubernetes_asyncio.client.exceptions import ApiException

    w = handle.workload
    try:
        return await CustomObjectsApi(api).get_namespaced_custom_object(
            w["group"], w["version"], handle.namespace, w["plural"], handle.job
        )
    except ApiException as error:
        if error.status == 404:
            return deleted_workload()
        raise


async def _save_cursors(core, handle: KubernetesJobHandle) -> None:
    await core.patch_namespaced_config_map(handle.job, handle.namespace, cursors_patch(handle))
