"""The SSH launcher's deferrable wait: on the triggerer, one agent command per host per interval (which
also renews the replicas' lease), every new line into the task log, and an event once the job has
finished by gang semantics, failed, or gone silent on a host."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from airflow.triggers.base import BaseTrigger, TriggerEvent

from airflow_provider_dnntrain.backends.base import JobState, JobStatus
from airflow_provider_dnntrain.backends.ssh.job import SSHJobHandle
from airflow_provider_dnntrain.backends.ssh.remote_async import AsyncRemoteHost
from airflow_provider_dnntrain.triggers import job_deadline, job_event, past_deadline, serialized

_ACK_SECONDS = 10

# What re-creates the trigger on any triggerer: its arguments, serialized.
ARGUMENTS = (
    "state",
    "secrets",
    "poll_interval",
    "unreachable_timeout",
    "timeout",
    "deadline",
    "grace_seconds",
)


class SSHJobTrigger(BaseTrigger):
    """Polls an SSH job's hosts through the ssh provider's async hook, all hosts at once, on the
    triggerer's event loop; one connection per host for the whole wait."""

    def __init__(
        self,
        *,
        state: dict[str, Any],
        secrets: list[str],
        poll_interval: float,
        unreachable_timeout: float,
        timeout: float | None = None,
        deadline: float | None = None,
        grace_seconds: float = 10.0,
    ) -> None:
        super().__init__()
        self.grace_seconds = grace_seconds
        self.state = state
        self.secrets = secrets
        self.poll_interval = poll_interval
        self.unreachable_timeout = unreachable_timeout
        self.timeout = timeout
        self.deadline = job_deadline(timeout, deadline)

    def serialize(self) -> tuple[str, dict[str, Any]]:
        return serialized(self, *ARGUMENTS)

    async def on_kill(self) -> None:
        """The task was marked failed or success, or cleared, while deferred: stop every replica."""
        handle = SSHJobHandle.from_state(self.state, self.secrets)
        hosts = _async_hosts(handle)
        try:
            grace = self.grace_seconds
            stop = lambda label: handle.agent_argv(label, "stop", str(grace))  # noqa: E731
            await _on_hosts(handle, hosts, stop, grace + 30)
        finally:
            for host in hosts.values():
                host.close()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        handle = SSHJobHandle.from_state(self.state, self.secrets)
        hosts = _async_hosts(handle)
        try:
            while True:
                answers = await _on_hosts(handle, hosts, handle.poll_argv, self.unreachable_timeout)
                try:
                    for label, answer in answers.items():
                        handle.take_answer(label, answer)
                    status = handle.evaluate(self.unreachable_timeout)
                except Exception as error:  # the task still has to stop the job: hand it back
                    problem = f"{type(error).__name__}: {error}"
                    status = JobStatus(JobState.FAILED, f"job {handle.run_id}: {problem}")
                for line in handle.take_lines():
                    self.log.info("%s", line)
                status = past_deadline(status, handle.run_id, self.timeout, self.deadline)
                if status.state.finished:
                    yield TriggerEvent(job_event(handle, status))
                    return
                await asyncio.sleep(self.poll_interval)
        except asyncio.CancelledError:
            # The triggerer is stopping (or the task was ended): the hosts keep how far this trigger
            # logged, so that the one that takes the job over logs no line twice.
            with contextlib.suppress(Exception):
                await _on_hosts(handle, hosts, handle.ack_argv, _ACK_SECONDS)
            raise
        finally:
            for host in hosts.values():
                host.close()


def _async_hosts(handle: SSHJobHandle) -> dict[str, AsyncRemoteHost]:
    return {label: AsyncRemoteHost(host.spec, label) for label, host in handle.hosts.items()}


async def _on_hosts(
    handle: SSHJobHandle,
    hosts: dict[str, AsyncRemoteHost],
    argv_for: Callable[[str], list[str]],
    timeout: float,
) -> dict[str, Any]:
    """The agent command ``argv_for(label)`` on every host not given up for lost, at once: each one's
    answer, or what it raised, by label."""
    labels = [label for label in hosts if label not in handle.lost]
    runs = (hosts[label].run_json(argv_for(label), timeout) for label in labels)
    return dict(zip(labels, await asyncio.gather(*runs, return_exceptions=True), strict=True))
