"""The Docker launcher's deferrable wait: on the triggerer, every interval, the run's containers
inspected, the watchdog's lease renewed (so the run outlives the task process that deferred), every new
line read from the containers' logs past the cursors into the task log, and an event once the job has
finished by gang semantics or outlived its deadline. The daemon's calls run in a thread each: the
Docker SDK is synchronous."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_dnntrain.backends.base import JobState, JobStatus
from airflow_provider_dnntrain.triggers import job_deadline, job_event, past_deadline, serialized

# What re-creates the trigger on any triggerer: its arguments, serialized.
ARGUMENTS = ("state", "secrets", "docker_url", "poll_interval", "lease_interval", "timeout", "deadline",
             "grace_seconds")  # fmt: skip


class DockerJobTrigger(BaseTrigger):
    def __init__(
        self,
        *,
        state: dict[str, Any],
        secrets: list[str],
        docker_url: str | None,
        poll_interval: float = 1.0,
        lease_interval: float = 10.0,
        timeout: float | None = None,
        deadline: float | None = None,
        grace_seconds: float = 10.0,
    ) -> None:
        super().__init__()
        self.state, self.secrets, self.docker_url = state, secrets, docker_url
        self.poll_interval, self.lease_interval = poll_interval, lease_interval
        self.timeout, self.deadline = timeout, job_deadline(timeout, deadline)
        self.grace_seconds = grace_seconds

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return serialized(self, *ARGUMENTS)

    def _launcher(self):
        from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher

        return DockerLauncher(
            docker_url=self.docker_url,
            lease_interval=self.lease_interval,
            stop_grace_seconds=self.grace_seconds,
        )

    async def on_kill(self) -> None:
        """The task was marked failed or success, or cleared, while deferred: the run's watchdog ends it."""
        from airflow_provider_dnntrain.backends.docker.job import DockerJobHandle

        handle = DockerJobHandle.from_state(self.state, self.secrets)
        await asyncio.to_thread(self._launcher().cancel, handle)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        from airflow_provider_dnntrain.backends.docker.job import DockerJobHandle

        launcher, handle = self._launcher(), DockerJobHandle.from_state(self.state, self.secrets)
        while True:
            try:
                status = await asyncio.to_thread(_look, launcher, handle)
            except Exception as error:  # the task still has to stop the job: hand it back
                status = JobStatus(JobState.FAILED, f"job {handle.run_id}: {type(error).__name__}: {error}")
            for line in handle.drain(0):
                self.log.info("%s", line)
            status = past_deadline(status, handle.run_id, self.timeout, self.deadline)
            if status.state.finished:
                yield TriggerEvent(job_event(handle, status))
                return
            await asyncio.sleep(self.poll_interval)


def _look(launcher, handle) -> JobStatus:
    """The run's status (its lease renewed when due), and its new lines read into the handle."""
    status = launcher.poll(handle)
    handle.read_new(launcher.client.api)
    return status
