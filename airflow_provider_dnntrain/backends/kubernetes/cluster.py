"""A Kubernetes run's calls to the API server, through the cncf-kubernetes provider's hook: creating the
run's objects, listing its pods, reading and deleting its Kubeflow job, deleting the run and waiting
until its pods are gone, and copying the chief's outputs out of its pod through ``exec``."""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from pathlib import Path

from airflow_provider_dnntrain.backends.kubernetes.manifests import BOOTSTRAP, OUTPUTS_CONTAINER, RunObjects
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun
from airflow_provider_dnntrain.backends.kubernetes.status import deleted_workload

log = logging.getLogger(__name__)
DELETE_WAIT_SECONDS = 60
_EXEC_TIMEOUT_SECONDS = 120
_CONNECTIONS = 1100  # log streams of the widest runs, and the calls
_CREATING_AT_ONCE = 16  # pods created in parallel: a wide run starts in round trips / 16


class Cluster:
    """The cluster ``hook`` reaches, as a run uses it."""

    def __init__(self, hook) -> None:
        self.hook = hook

    @cached_property
    def core(self):
        core = self.hook.core_v1_client
        # Every pod's log is one long-lived stream: room for them besides the calls (urllib3 would
        # otherwise warn, into the task log, on every connection past its default ten).
        with contextlib.suppress(AttributeError):
            core.api_client.rest_client.pool_manager.connection_pool_kw["maxsize"] = _CONNECTIONS
        return core

    # -- creating -------------------------------------------------------------------------------

    def create_owner(self, namespace: str, owner: dict) -> str:
        """The run's ConfigMap, which owns everything else; its uid."""
        return self.core.create_namespaced_config_map(namespace, owner).metadata.uid

    def create_children(self, namespace: str, objects: RunObjects, with_pods_service: bool) -> None:
        """The Secret and, unless a Kubeflow job makes the pods' Services itself, the Service and a
        gang scheduler's PodGroup."""
        self.core.create_namespaced_secret(namespace, objects.secret)
        if not with_pods_service:
            return
        self.core.create_namespaced_service(namespace, objects.service)
        if objects.pod_group is not None:
            group, version = objects.pod_group["apiVersion"].split("/")
            self.hook.custom_object_client.create_namespaced_custom_object(
                group, version, namespace, "podgroups", objects.pod_group
            )

    def create_pods(self, namespace: str, pods: list[dict]) -> None:
        with ThreadPoolExecutor(max_workers=_CREATING_AT_ONCE) as pool:
            list(pool.map(lambda pod: self.core.create_namespaced_pod(namespace, pod), pods))

    def create_workload(self, run: KubernetesRun, workload: dict) -> None:
        """The run's Kubeflow job; a cluster that serves no such kind says to install the operator."""
        from kubernetes.client.exceptions import ApiException

        w = run.workload
        try:
            self.hook.custom_object_client.create_namespaced_custom_object(
                w["group"], w["version"], run.namespace, w["plural"], workload
            )
        except ApiException as error:
            if error.status == 404:
                raise RuntimeError(
                    f"kubeflow: the cluster serves no {workload['kind']} ({w['group']}/{w['version']} "
                    f"{w['plural']}): install the Kubeflow training operator, or run with kubeflow=False"
                ) from None
            raise

    # -- reading --------------------------------------------------------------------------------

    def list_pods(self, run: KubernetesRun) -> list:
        return self.core.list_namespaced_pod(run.namespace, label_selector=run.selector).items

    def owner_of(self, run: KubernetesRun):
        """The run's ConfigMap, which owns everything else: ``RuntimeError`` when it is gone, or is
        another launch's (a different uid)."""
        from kubernetes.client.exceptions import ApiException

        try:
            owner = self.core.read_namespaced_config_map(run.job, run.namespace)
        except ApiException as error:
            if error.status == 404:
                raise RuntimeError(f"run {run.run_id}: its objects are gone from the cluster") from None
            raise
        if owner.metadata.uid != run.owner_uid:
            raise RuntimeError(f"run {run.run_id}: its owner was replaced by another launch")
        return owner

    def read_workload(self, run: KubernetesRun) -> dict | None:
        """The run's Kubeflow job (its status: the training operator's verdict), if it has one."""
        from kubernetes.client.exceptions import ApiException

        if run.workload is None:
            return None
        w = run.workload
        try:
            return self.hook.custom_object_client.get_namespaced_custom_object(
                w["group"], w["version"], run.namespace, w["plural"], run.job
            )
        except ApiException as error:
            if error.status == 404:
                return deleted_workload()
            raise

    def save_cursors(self, run: KubernetesRun, patch: dict) -> None:
        self.core.patch_namespaced_config_map(run.job, run.namespace, patch)

    # -- deleting -------------------------------------------------------------------------------

    def delete_workload(self, run: KubernetesRun) -> None:
        from kubernetes.client.exceptions import ApiException

        w = run.workload
        try:
            self.hook.custom_object_client.delete_namespaced_custom_object(
                w["group"], w["version"], run.namespace, w["plural"], run.job
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def delete_pods(self, run: KubernetesRun, grace_seconds: float) -> None:
        self.core.delete_collection_namespaced_pod(
            run.namespace, label_selector=run.selector, grace_period_seconds=int(grace_seconds)
        )

    def delete_owner(self, run: KubernetesRun) -> None:
        """Delete the run's owner: the cluster's garbage collector deletes everything it owns."""
        from kubernetes.client import V1DeleteOptions
        from kubernetes.client.exceptions import ApiException

        try:
            self.core.delete_namespaced_config_map(
                run.job, run.namespace, body=V1DeleteOptions(propagation_policy="Background")
            )
        except ApiException as error:
            if error.status != 404:
                raise

    def wait_until_gone(self, run: KubernetesRun, timeout: float) -> list[str]:
        """The run's pods still there after ``timeout`` (none: all gone)."""
        deadline = time.monotonic() + timeout
        while left := [p.metadata.name for p in self.list_pods(run)]:
            if time.monotonic() > deadline:
                return left
            time.sleep(0.25)
        return []

    # -- outputs --------------------------------------------------------------------------------

    def copy_outputs(self, run: KubernetesRun, pod: str, python: str, target: Path) -> None:
        """The outputs and logs the bootstrap packs in ``pod``'s outputs sidecar (with ``python``, as a
        base64 tar.gz), unpacked into ``target``."""
        packed = self._exec(run, pod, [python, BOOTSTRAP, "pack"])
        with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed)), mode="r:gz") as tar:
            tar.extractall(target, filter="data")

    def _exec(self, run: KubernetesRun, pod: str, command: list[str]) -> str:
        from kubernetes.client import CoreV1Api
        from kubernetes.stream import stream

        # A client of its own: ``stream`` swaps its client's transport for a websocket while it runs.
        core = CoreV1Api(self.hook.get_conn())
        client = stream(
            core.connect_get_namespaced_pod_exec,
            pod,
            run.namespace,
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
