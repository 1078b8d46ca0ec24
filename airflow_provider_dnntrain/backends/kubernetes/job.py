"""A Kubernetes run in this process: what is saved of it (:class:`KubernetesRun`), and what lives only
here - its pods' logs as they are followed (one thread per pod), what was learnt of its pods, the
settings its pods were rendered with, the tracking store served to them, and how it is ending."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from airflow_provider_dnntrain.backends.base import JobHandle, JobState, JobStatus
from airflow_provider_dnntrain.backends.common.lines import Redactor
from airflow_provider_dnntrain.backends.kubernetes.logs import PodLogs, follow_in_thread
from airflow_provider_dnntrain.backends.kubernetes.manifests import CURSORS_ANNOTATION
from airflow_provider_dnntrain.backends.kubernetes.pending import PodTimeouts
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun
from airflow_provider_dnntrain.backends.kubernetes.status import (
    PodWatch,
    evaluate,
    main_container_started,
    pods_to_ask_about,
)
from airflow_provider_dnntrain.topology import JobPlan

log = logging.getLogger(__name__)


@dataclass(eq=False)
class KubernetesJobHandle(JobHandle):
    run: KubernetesRun
    redactor: Redactor
    logs: PodLogs = field(init=False)
    watch: PodWatch = field(default_factory=PodWatch)
    status: JobStatus = field(default_factory=lambda: JobStatus(JobState.RUNNING))
    settings: Any = None  # the RunSettings its pods are rendered with
    pod_manifests: list[dict] = field(default_factory=list)  # created once pending values are given
    provided: dict[str, str] = field(default_factory=dict)  # pending values given so far
    relay: Any = None  # the StoreServer serving the embedded tracking store to the pods, if any
    last_poll: float = 0.0
    lease_renewed_at: float = 0.0
    cancelled: bool = False
    stopped: bool = False
    outputs_lost: str = ""  # why the chief's outputs could not be copied, if they could not
    _readers: dict[str, threading.Thread] = field(default_factory=dict)
    _responses: dict[str, Any] = field(default_factory=dict)  # each pod's stream open last

    def __post_init__(self) -> None:
        self.logs = PodLogs(self.run, self.redactor)

    @property
    def run_id(self) -> str:
        return self.run.run_id

    @property
    def plan(self) -> JobPlan:
        return self.run.plan

    @property
    def namespace(self) -> str:
        return self.run.namespace

    @property
    def selector(self) -> str:
        return self.run.selector

    @property
    def tails(self):
        return self.logs.tails

    def ended(self, replica: str) -> bool:
        """Whether a replica's log has nothing more to give: its container ended, or the run stopped."""
        return self.watch.exit_codes.get(replica) is not None or self.stopped

    def evaluate(self, pods: list[Any], timeouts: PodTimeouts, workload: dict | None = None) -> JobStatus:
        return evaluate(self.run, self.watch, pods, timeouts, workload)

    def observe(self, cluster, timeouts: PodTimeouts, gang) -> JobStatus:
        """One look at the run through ``cluster``: its pods (the logs of those started followed), for
        pods past their bound to be scheduled whether the autoscaler is adding a node, the Kubeflow
        job's verdict; the status by gang semantics. Says what waiting pods wait for, now and then."""
        pods = cluster.list_pods(self.run)
        for pod in pods:
            if main_container_started(pod, self.run.container):
                self.follow(cluster.core, pod.metadata.name, cluster.patience.request_timeout)
        for pod in pods_to_ask_about(self.watch, pods, timeouts):
            if cluster.scaling_up_for(self.run, pod):
                self.watch.scaling_up.add(pod)
        status = self.evaluate(pods, timeouts, cluster.read_workload(self.run))
        if note := self.watch.note_due(pods, gang):
            log.info("Run %s: %s", self.run_id, note)
        if self.logs.cursors_due():
            cluster.save_cursors(self.run, self.cursors_patch())
        if self.lease_due(timeouts):
            cluster.renew_lease(self.run)
        return status

    def lease_due(self, timeouts: PodTimeouts) -> bool:
        """Whether it is time to renew the run's lease (and, if so, it is counted as renewed)."""
        every = timeouts.renew_every
        if every is None or time.monotonic() - self.lease_renewed_at < every:
            return False
        self.lease_renewed_at = time.monotonic()
        return True

    # -- logs -----------------------------------------------------------------------------------

    def follow(self, core, pod: str, timeout: float) -> None:
        """Start reading ``pod``'s log in a thread of its own, unless one already does (``timeout``: the
        stream's, as ``follow_in_thread`` takes it)."""
        if pod in self._readers or self.logs.closing.is_set():
            return
        follower = self.logs.follower(pod, self.ended)
        reader = threading.Thread(
            target=follow_in_thread,
            args=(core, follower, functools.partial(self._responses.__setitem__, pod), timeout),
            name=f"log-{pod}",
            daemon=True,
        )
        self._readers[pod] = reader
        reader.start()

    def finish_reading_ended(self, timeout: float) -> None:
        """Let the readers of ended containers' logs reach their end (a stream cut just before a
        container ended is opened again for the rest)."""
        deadline = time.monotonic() + timeout
        for pod, reader in list(self._readers.items()):
            if self.ended(self.run.replica_of(pod)):
                reader.join(max(0.0, deadline - time.monotonic()))

    def finish_reading(self, timeout: float) -> None:
        """Let every reader reach the end of its (ended) pod's log, then stop the rest."""
        deadline = time.monotonic() + timeout
        for reader in list(self._readers.values()):
            reader.join(max(0.0, deadline - time.monotonic()))
        self.logs.closing.set()
        for response in list(self._responses.values()):
            # Shut, not released to the pool: a reader may still be in the middle of it.
            with contextlib.suppress(Exception):  # already closed
                response.shutdown()
            with contextlib.suppress(Exception):
                response.close()

    def take_saved_cursors(self, owner) -> None:
        """Start from where an earlier watcher of the run got to: the cursors it left on the run's
        owner (the API's ConfigMap object)."""
        saved = (owner.metadata.annotations or {}).get(CURSORS_ANNOTATION)
        if saved:
            self.logs.take_cursors(json.loads(saved))

    def cursors_patch(self) -> dict:
        """The patch that leaves how far each pod's log was logged on the run's owner."""
        return {"metadata": {"annotations": {CURSORS_ANNOTATION: json.dumps(self.logs.cursor_state())}}}

    # -- surviving the task process -------------------------------------------------------------

    def to_state(self) -> dict:
        self.run.cursors = self.logs.cursor_state()
        self.run.pods_created = self.watch.created_at is not None
        return self.run.to_state()

    @classmethod
    def from_state(cls, state: dict, secrets: list[str]) -> KubernetesJobHandle:
        run = KubernetesRun.from_state(state)
        return cls(
            run=run,
            redactor=Redactor(secrets),
            watch=PodWatch(time.monotonic() if run.pods_created else None),
        )
