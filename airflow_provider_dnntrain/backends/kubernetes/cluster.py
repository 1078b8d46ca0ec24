"""A Kubernetes run's calls to the API server, through the cncf-kubernetes provider's hook: creating the
run's objects, listing its pods, reading and deleting its Kubeflow job, deleting the run and waiting
until its pods are gone.

Every call goes through the run's :class:`ApiPatience` (a request timeout; transient failures
retried). A create is idempotent: an object that already exists and is this launch's (a create
whose answer was lost) counts as made. Deleting needs no more than the documented Role: where a
``deletecollection`` is forbidden the pods are deleted one by one.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

from airflow_provider_dnntrain.backends.kubernetes.api import ApiPatience
from airflow_provider_dnntrain.backends.kubernetes.manifests import (
    LAUNCH_ANNOTATION,
    LEASE_KEY,
    RUN_LABEL,
    RunObjects,
)
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun
from airflow_provider_dnntrain.backends.kubernetes.status import deleted_workload

log = logging.getLogger(__name__)
DELETE_WAIT_SECONDS = 60
_CONNECTIONS = 1100  # log streams of the widest runs, and the calls
_CREATING_AT_ONCE = 16  # pods created in parallel: a wide run starts in round trips / 16
_CLASH_SECONDS = 60  # how long an earlier launch's object of the same name may take to go


def _status(error: BaseException) -> int | None:
    return getattr(error, "status", None) if hasattr(error, "reason") else None


class Cluster:
    """The cluster ``hook`` reaches, as a run uses it, with ``patience`` for its API server."""

    def __init__(self, hook, patience: ApiPatience | None = None) -> None:
        self.hook = hook
        self.patience = patience or ApiPatience()

    @cached_property
    def core(self):
        core = self.hook.core_v1_client
        # Every pod's log is one long-lived stream: room for them besides the calls (urllib3 would
        # otherwise warn, into the task log, on every connection past its default ten).
        with contextlib.suppress(AttributeError):
            pools = core.api_client.rest_client.pool_manager.connection_pool_kw
            pools["maxsize"] = _CONNECTIONS
            pools["retries"] = False  # the run's patience retries, and says so only when it matters
        return core

    @cached_property
    def custom(self):
        return self.hook.custom_object_client

    def call(self, what: str, function, *args, **kwargs):
        return self.patience.call(what, function, *args, **kwargs)

    # -- creating -------------------------------------------------------------------------------

    def create_owner(self, namespace: str, owner: dict) -> str:
        """The run's ConfigMap, which owns everything else; its uid."""
        launch = owner["metadata"]["annotations"][LAUNCH_ANNOTATION]
        made = self._create_once(
            f"create configmap {owner['metadata']['name']}",
            lambda **kw: self.core.create_namespaced_config_map(namespace, owner, **kw),
            lambda **kw: self.core.read_namespaced_config_map(owner["metadata"]["name"], namespace, **kw),
            lambda found: (found.metadata.annotations or {}).get(LAUNCH_ANNOTATION) == launch,
        )
        return made.metadata.uid

    def create_children(self, namespace: str, objects: RunObjects, with_pods_service: bool) -> None:
        """The Secrets and, unless a Kubeflow job makes the pods' Services itself, the Service and a
        gang scheduler's PodGroup."""
        core = self.core
        for secret in filter(None, (objects.secret, objects.pull_secret)):
            self._create_child(core.create_namespaced_secret, core.read_namespaced_secret, namespace, secret)
        if not with_pods_service:
            return
        self._create_child(
            core.create_namespaced_service, core.read_namespaced_service, namespace, objects.service
        )
        if objects.pod_group is not None:
            self.create_custom(namespace, "podgroups", objects.pod_group)

    def create_pods(self, namespace: str, pods: list[dict]) -> None:
        core = self.core

        def create(pod: dict) -> None:
            self._create_child(core.create_namespaced_pod, core.read_namespaced_pod, namespace, pod)

        with ThreadPoolExecutor(max_workers=_CREATING_AT_ONCE) as pool:
            list(pool.map(create, pods))

    def create_custom(self, namespace: str, plural: str, body: dict) -> None:
        group, version = body["apiVersion"].split("/")
        name = body["metadata"]["name"]
        self._create_once(
            f"create {plural} {name}",
            lambda **kw: self.custom.create_namespaced_custom_object(
                group, version, namespace, plural, body, **kw
            ),
            lambda **kw: self.custom.get_namespaced_custom_object(
                group, version, namespace, plural, name, **kw
            ),
            lambda found: _owner_uids(found["metadata"]) == _owner_uids(body["metadata"]),
        )

    def create_workload(self, run: KubernetesRun, workload: dict) -> None:
        """The run's Kubeflow job; a cluster that serves no such kind says to install the operator."""
        try:
            self.create_custom(run.namespace, run.workload["plural"], workload)
        except Exception as error:
            if _status(error) == 404:
                w = run.workload
                raise RuntimeError(
                    f"kubeflow: the cluster serves no {workload['kind']} ({w['group']}/{w['version']} "
                    f"{w['plural']}): install the Kubeflow training operator, or run with kubeflow=False"
                ) from None
            raise

    def _create_child(self, create, read, namespace: str, body: dict) -> None:
        """An object the run's owner owns: one already there with the same owner is this one."""
        name = body["metadata"]["name"]
        self._create_once(
            f"create {body['kind'].lower()} {name}",
            lambda **kw: create(namespace, body, **kw),
            lambda **kw: read(name, namespace, **kw),
            lambda found: _owner_uids(found.metadata) == _owner_uids(body["metadata"]),
        )

    def _create_once(self, what: str, create, read, is_ours):
        """``create()``'s object; on a clash (409), the object there if ``is_ours(it)`` - a create whose
        answer was lost - else, once an earlier launch's object of the name has gone, a new one."""
        deadline = time.monotonic() + _CLASH_SECONDS
        while True:
            try:
                return self.call(what, create)
            except Exception as error:
                if _status(error) != 409:
                    raise
            with contextlib.suppress(Exception):
                found = self.call(what, read)
                if is_ours(found):
                    return found
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what}: an object of that name, not this run's, is still there")
            time.sleep(1.0)

    # -- reading --------------------------------------------------------------------------------

    def list_pods(self, run: KubernetesRun) -> list:
        return self.call(
            "list pods", self.core.list_namespaced_pod, run.namespace, label_selector=run.selector
        ).items

    def owner_of(self, run: KubernetesRun):
        """The run's ConfigMap, which owns everything else: ``RuntimeError`` when it is gone, or is
        another launch's (a different uid)."""
        try:
            owner = self.call(
                "read the run's configmap", self.core.read_namespaced_config_map, run.job, run.namespace
            )
        except Exception as error:
            if _status(error) == 404:
                raise RuntimeError(f"run {run.run_id}: its objects are gone from the cluster") from None
            raise
        if owner.metadata.uid != run.owner_uid:
            raise RuntimeError(f"run {run.run_id}: its owner was replaced by another launch")
        return owner

    def read_workload(self, run: KubernetesRun) -> dict | None:
        """The run's Kubeflow job (its status: the training operator's verdict), if it has one."""
        if run.workload is None:
            return None
        w = run.workload
        try:
            return self.call(
                f"read {w['plural']} {run.job}",
                self.custom.get_namespaced_custom_object,
                w["group"], w["version"], run.namespace, w["plural"], run.job,
            )  # fmt: skip
        except Exception as error:
            if _status(error) == 404:
                return deleted_workload()
            raise

    def scaling_up_for(self, run: KubernetesRun, pod: str) -> bool:
        """Whether the cluster autoscaler said it is adding a node for ``pod`` (its last word on it:
        ``TriggeredScaleUp``, not ``NotTriggerScaleUp``). A Role without ``events`` says no."""
        try:
            events = self.call(
                f"list events of pod {pod}", self.core.list_namespaced_event, run.namespace,
                field_selector=f"involvedObject.name={pod}",
            ).items  # fmt: skip
        except Exception as error:
            if _status(error) != 403:
                raise
            return False
        return scaled_up(events)

    def renew_lease(self, run: KubernetesRun) -> None:
        """Tell the run's pods it is still watched (its ConfigMap's lease, which they read); a renewal
        that fails is tried again at the next, well within the pods' patience."""
        try:
            self.core.patch_namespaced_config_map(
                run.job, run.namespace, lease_patch(), _request_timeout=self.patience.timeout
            )
        except Exception as error:
            log.debug("Run %s: could not renew its lease: %s", run.run_id, error)

    def save_cursors(self, run: KubernetesRun, patch: dict) -> None:
        """How far each pod's log was logged, on the run's owner: a try that takes the run over after
        this worker died repeats at most the lines of the last few seconds. A save that fails is
        tried again at the next; the job goes on."""
        try:
            self.core.patch_namespaced_config_map(
                run.job, run.namespace, patch, _request_timeout=self.patience.timeout
            )
        except Exception as error:
            log.debug("Run %s: could not save log cursors: %s", run.run_id, error)

    # -- deleting -------------------------------------------------------------------------------

    def delete_run_pods(self, run: KubernetesRun, grace_seconds: float) -> list[str]:
        """Delete the run's Kubeflow job (first, or its operator would make the pods again) and pods;
        the pods still there once they had their grace and a minute more (none: all gone)."""
        if run.workload is not None:
            self.delete_workload(run)
        self.delete_pods(run, grace_seconds)
        return self.wait_until_gone(run, grace_seconds + DELETE_WAIT_SECONDS)

    def delete_workload(self, run: KubernetesRun) -> None:
        w = run.workload
        self._delete(
            f"delete {w['plural']} {run.job}",
            self.custom.delete_namespaced_custom_object,
            w["group"], w["version"], run.namespace, w["plural"], run.job,
        )  # fmt: skip

    def delete_pods(self, run: KubernetesRun, grace_seconds: float) -> None:
        """Every pod of the run: in one request where the Role allows it, else one by one."""
        grace = int(grace_seconds)
        try:
            self.call(
                "delete pods",
                self.core.delete_collection_namespaced_pod,
                run.namespace, label_selector=run.selector, grace_period_seconds=grace,
            )  # fmt: skip
            return
        except Exception as error:
            if _status(error) != 403:
                raise
        for pod in self.list_pods(run):
            name = pod.metadata.name
            self._delete(
                f"delete pod {name}", self.core.delete_namespaced_pod, name, run.namespace,
                grace_period_seconds=grace,
            )  # fmt: skip

    def unwatched_runs(self, namespace: str, older_than: float) -> list[str]:
        """The runs in ``namespace`` whose lease nobody renewed for ``older_than`` seconds (by this
        machine's clock): their tasks are gone."""
        owners = self.call(
            "list the runs' configmaps",
            self.core.list_namespaced_config_map,
            namespace,
            label_selector=RUN_LABEL,
        ).items
        now = time.time()
        return [o.metadata.name for o in owners if now - _last_watched(o) > older_than]

    def delete_run(self, namespace: str, name: str) -> None:
        """A run's owner, and with it (by the garbage collector) everything of the run."""
        from kubernetes.client import V1DeleteOptions

        self._delete(
            f"delete configmap {name}", self.core.delete_namespaced_config_map, name, namespace,
            body=V1DeleteOptions(propagation_policy="Background"),
        )  # fmt: skip

    def delete_owner(self, run: KubernetesRun) -> None:
        """Delete the run's owner: the cluster's garbage collector deletes everything it owns."""
        from kubernetes.client import V1DeleteOptions

        self._delete(
            "delete the run's configmap",
            self.core.delete_namespaced_config_map,
            run.job, run.namespace, body=V1DeleteOptions(propagation_policy="Background"),
        )  # fmt: skip

    def _delete(self, what: str, function, *args, **kwargs) -> None:
        try:
            self.call(what, function, *args, **kwargs)
        except Exception as error:
            if _status(error) != 404:
                raise

    def wait_until_gone(self, run: KubernetesRun, timeout: float) -> list[str]:
        """The run's pods still there after ``timeout`` (none: all gone)."""
        deadline = time.monotonic() + timeout
        while left := [p.metadata.name for p in self.list_pods(run)]:
            if time.monotonic() > deadline:
                return left
            time.sleep(0.25)
        return []


def _last_watched(owner) -> float:
    """When a run's lease was last renewed (epoch seconds), or, before its first renewal, created."""
    lease = (owner.data or {}).get(LEASE_KEY, "0")
    with contextlib.suppress(ValueError):
        if float(lease) > 0:
            return float(lease)
    return owner.metadata.creation_timestamp.timestamp()


def lease_patch() -> dict:
    return {"data": {LEASE_KEY: f"{time.time():.3f}"}}


def scaled_up(events: list) -> bool:
    """Whether the autoscaler's last word among ``events`` (the API's, either client's) was a scale-up."""
    said = [e for e in events if e.reason in ("TriggeredScaleUp", "NotTriggerScaleUp")]
    said.sort(key=lambda e: str(e.last_timestamp or e.event_time or e.metadata.creation_timestamp or ""))
    return bool(said) and said[-1].reason == "TriggeredScaleUp"


def _owner_uids(metadata) -> list[str]:
    """The uids a (dict or API model) object's metadata names as its owners."""
    references = metadata.get("ownerReferences") if isinstance(metadata, dict) else metadata.owner_references
    return sorted((r["uid"] if isinstance(r, dict) else r.uid) for r in references or [])
