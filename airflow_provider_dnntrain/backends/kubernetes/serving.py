"""Endpoints on Kubernetes: a Deployment per slot (blue/green) behind the endpoint's Service, through
the cncf-kubernetes provider's hook, with the API server's patience of the training launcher.

A new version's Deployment starts beside the serving one; its pods fetch the version from the registry
(an init container) and must pass their readiness probe (``GET /ping``). The smoke test reaches one of
its pods through the API server (``pods/portforward``), as ``kubectl port-forward`` does, so the worker
needs no route into the cluster. The switch is the Service's selector moving to the new slot. A canary
keeps both slots behind the Service, the new one with replicas for about its share of the traffic.
Deploys of one endpoint are serialised by a Lease.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from airflow_provider_dnntrain.backends.common.bundle import SERVING_IMAGES
from airflow_provider_dnntrain.backends.common.tunnels import local_forward
from airflow_provider_dnntrain.backends.kubernetes import serving_manifests as manifests
from airflow_provider_dnntrain.backends.kubernetes import serving_status
from airflow_provider_dnntrain.backends.kubernetes.api import ApiPatience
from airflow_provider_dnntrain.backends.kubernetes.lease import LeaseLock
from airflow_provider_dnntrain.backends.serving import (
    EndpointState,
    ServedVersion,
    Serving,
    ServingFailed,
    checked_endpoint,
)

SLOTS = ("blue", "green")


class KubernetesServing(Serving):
    """Models served on the cluster of ``kubernetes_conn_id`` (``in_cluster``, ``config_file``,
    ``cluster_context`` as ``KubernetesHook`` takes them), in ``namespace`` (default: the connection's).

    ``image``: the servers' image, with MLflow and the version's framework (default: the project's
    training image for the version's framework); ``python``: its interpreter. ``replicas`` pods per
    version; ``resources``: the server container's (default: the version's resource configuration).
    ``service_type``/``port``: the endpoint's Service (``ClusterIP`` on port 80: clients in the cluster
    call ``http://<endpoint>.<namespace>.svc.cluster.local/invocations``). ``registry_uri``: how pods
    reach the model registry (default: the deploy task's tracking URI). ``pod_options``: more of the
    pod's spec (``serviceAccountName``, ``nodeSelector``, ``tolerations``, ``imagePullSecrets``...).
    """

    def __init__(
        self,
        *,
        kubernetes_conn_id: str | None = "kubernetes_default",
        namespace: str | None = None,
        in_cluster: bool | None = None,
        config_file: str | None = None,
        cluster_context: str | None = None,
        image: str | None = None,
        python: str = "python",
        replicas: int = 1,
        resources: dict | None = None,
        service_type: str = "ClusterIP",
        port: int = 80,
        registry_uri: str | None = None,
        pod_options: dict | None = None,
        startup_timeout: float = 300,
        api_request_timeout: float = 30.0,
    ) -> None:
        if replicas < 1:
            raise ValueError(f"replicas: {replicas} is not at least 1")
        self.connection = {
            "conn_id": kubernetes_conn_id,
            "in_cluster": in_cluster,
            "config_file": config_file,
            "cluster_context": cluster_context,
        }
        self.namespace = namespace
        self.image, self.python, self.replicas = image, python, replicas
        self.resources, self.service_type, self.port = resources, service_type, port
        self.registry_uri = registry_uri
        self.pod_options = dict(pod_options or {})
        self.startup_timeout = startup_timeout
        self.api = ApiPatience(request_timeout=api_request_timeout)

    server_port = manifests.SERVER_PORT  # where a slot's pods answer, for the smoke test
    probe_path = "/ping"  # what says they are ready

    def __deepcopy__(self, memo):  # an operator's copy: the same settings, no clients of its own yet
        copied = object.__new__(type(self))
        clients = ("hook", "core", "apps", "custom")
        copied.__dict__.update({k: v for k, v in self.__dict__.items() if k not in clients})
        return copied

    # -- the cluster --------------------------------------------------------------------------------

    @cached_property
    def hook(self):
        from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook

        return KubernetesHook(**self.connection)

    @cached_property
    def core(self):
        return self.hook.core_v1_client

    @cached_property
    def apps(self):
        from kubernetes.client import AppsV1Api

        return AppsV1Api(self.hook.api_client)

    def _ns(self) -> str:
        if self.namespace is None:
            self.namespace = self.hook.get_namespace() or "default"
        return self.namespace

    def _call(self, what: str, function, *args, missing_ok: bool = False, **kwargs):
        try:
            return self.api.call(what, function, *args, **kwargs)
        except Exception as error:
            if missing_ok and getattr(error, "status", None) == 404:
                return None
            raise

    def _apply(self, kind: str, obj: dict) -> None:
        """Create, or replace what is there (a Secret or ConfigMap of an earlier deploy)."""
        create = getattr(self.core, f"create_namespaced_{kind}")
        try:
            self.api.call(f"create {kind}", create, self._ns(), obj)
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise
            replace = getattr(self.core, f"replace_namespaced_{kind}")
            self._call(f"replace {kind}", replace, obj["metadata"]["name"], self._ns(), obj)

    # -- what serves ----------------------------------------------------------------------------------

    def _deployments(self, endpoint: str) -> dict[str, Any]:
        selector = f"{manifests.ENDPOINT_LABEL}={endpoint}"
        listed = self._call(
            "list deployments", self.apps.list_namespaced_deployment, self._ns(), label_selector=selector
        )
        return {d.metadata.labels[manifests.SLOT_LABEL]: d for d in listed.items}

    def _service(self, endpoint: str):
        name = manifests.service_name(endpoint)
        return self._call(
            "read service", self.core.read_namespaced_service, name, self._ns(), missing_ok=True
        )

    def current(self, endpoint: str) -> EndpointState:
        checked_endpoint(endpoint)
        deployments, service = self._deployments(endpoint), self._service(endpoint)
        slots = {
            slot: d.metadata.annotations[manifests.VERSION_ANNOTATION] for slot, d in deployments.items()
        }
        selected = (service.spec.selector or {}).get(manifests.SLOT_LABEL) if service else None
        traffic = serving_status.traffic_shares(deployments, selected) if service else {}
        primary = max(traffic, key=traffic.get) if traffic else None
        base = self._base_uri(endpoint, service)
        return EndpointState(
            endpoint=endpoint,
            scoring_uri=f"{base}/invocations",
            health_uri=f"{base}/ping",
            serving=slots.get(primary) if primary else None,
            state="serving" if primary else "absent",
            slots=slots,
            traffic=traffic,
        )

    def _base_uri(self, endpoint: str, service) -> str:
        balancer = service.status.load_balancer if service and service.status else None
        ingress = balancer.ingress if balancer else None
        if ingress:
            host = ingress[0].ip or ingress[0].hostname
        else:
            host = f"{manifests.service_name(endpoint)}.{self._ns()}.svc.cluster.local"
        return f"http://{host}" + ("" if self.port == 80 else f":{self.port}")

    # -- starting a version -----------------------------------------------------------------------------

    def start(self, endpoint: str, version: ServedVersion, key_hash: str) -> str:
        if self.registry_uri:
            version = _with_registry(version, self.registry_uri)
        self._apply("secret", manifests.secret(endpoint, self._ns(), key_hash, version))
        self._apply("config_map", manifests.config_map(endpoint, self._ns()))
        now = self.current(endpoint)
        slot = next(s for s in SLOTS if s not in now.traffic)
        self._delete_deployment(endpoint, slot, wait=True)  # what an interrupted deploy left there
        obj = manifests.deployment(
            endpoint, self._ns(), slot, version,
            image=self.image or SERVING_IMAGES.get(version.framework, SERVING_IMAGES["pytorch"]),
            python=self.python, replicas=self.replicas,
            resources=manifests.resources_of(version, self.resources), pod_options=self.pod_options,
        )  # fmt: skip
        self._create_deployment(obj, version)
        try:
            self._wait_ready(endpoint, slot, self.replicas)
        except BaseException:
            self._delete_deployment(endpoint, slot)
            raise
        return slot

    def _create_deployment(self, obj: dict, version: ServedVersion) -> None:
        """Created; one that exists already for this version is a create whose answer was lost."""
        try:
            self.api.call("create deployment", self.apps.create_namespaced_deployment, self._ns(), obj)
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise
            name = obj["metadata"]["name"]
            found = self._call("read deployment", self.apps.read_namespaced_deployment, name, self._ns())
            if (found.metadata.annotations or {}).get(manifests.VERSION_ANNOTATION) != version.label:
                raise

    def _wait_ready(self, endpoint: str, slot: str, replicas: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        name = manifests.deployment_name(endpoint, slot)
        while time.monotonic() < deadline:
            found = self._call("read deployment", self.apps.read_namespaced_deployment, name, self._ns())
            status = found.status
            current = (status.observed_generation or 0) >= (found.metadata.generation or 0)
            if current and (status.ready_replicas or 0) >= replicas:
                return
            self._fail_if_broken(endpoint, slot)
            time.sleep(1)
        raise ServingFailed(
            f"endpoint {endpoint}: slot {slot}'s pods were not ready within {self.startup_timeout:.0f} s"
            f"{self._pods_said(endpoint, slot)}"
        )

    def _pod_selector(self, endpoint: str, slot: str) -> str:
        return f"{manifests.ENDPOINT_LABEL}={endpoint},{manifests.SLOT_LABEL}={slot}"

    def _pods(self, endpoint: str, slot: str) -> list:
        selector = self._pod_selector(endpoint, slot)
        return self._call(
            "list pods", self.core.list_namespaced_pod, self._ns(), label_selector=selector
        ).items

    def _fail_if_broken(self, endpoint: str, slot: str) -> None:
        """A pod whose init container or server failed, or keeps failing: its last words in the error."""
        for pod in self._pods(endpoint, slot):
            statuses = [*(pod.status.init_container_statuses or []), *(pod.status.container_statuses or [])]
            for status in statuses:
                why = serving_status.broken(status)
                if why:
                    log = self._log_tail(pod.metadata.name, status.name)
                    raise ServingFailed(
                        f"endpoint {endpoint}: the new version never answered {self.probe_path}: pod "
                        f"{pod.metadata.name}, container {status.name}: {why}; its log ends:\n{log}"
                    )

    def _log_tail(self, pod: str, container: str) -> str:
        try:
            answer = self.core.read_namespaced_pod_log(
                pod, self._ns(), container=container, tail_lines=40, _preload_content=False
            )
            return answer.data.decode(errors="replace")
        except Exception as error:
            return f"(no log: {error})"

    def _pods_said(self, endpoint: str, slot: str) -> str:
        said = []
        for pod in self._pods(endpoint, slot):
            for condition in pod.status.conditions or []:
                if condition.status != "True" and condition.message:
                    said.append(f"{pod.metadata.name}: {condition.reason}: {condition.message}")
        return ("; " + "; ".join(said)) if said else ""

    @contextlib.contextmanager
    def reaching(self, endpoint: str, slot: str) -> Iterator[str]:
        from kubernetes.stream import portforward

        ready = [p for p in self._pods(endpoint, slot) if serving_status.is_ready(p)]
        if not ready:
            raise ServingFailed(f"endpoint {endpoint}: slot {slot} has no ready pod")
        pod, port = ready[0].metadata.name, self.server_port

        def open_way():
            for attempt in range(5):  # the API server may refuse a handshake now and then (429, 5xx)
                try:
                    forward = portforward(
                        self.core.connect_get_namespaced_pod_portforward, pod, self._ns(), ports=str(port)
                    )
                    return forward.socket(port)
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(0.5 * 2**attempt)

        with local_forward(open_way) as local:
            yield f"http://127.0.0.1:{local}"

    # -- traffic -----------------------------------------------------------------------------------------

    def switch(self, endpoint: str, slot: str) -> EndpointState:
        self._scale(endpoint, slot, self.replicas)
        self._point_service(endpoint, slot)
        return self.current(endpoint)

    def _point_service(self, endpoint: str, slot: str | None) -> None:
        """The Service made, or its selector moved (a patch: its address and the rest stay as they are;
        ``None`` removes the slot from the selector, so that every slot's pods take requests)."""
        if self._service(endpoint) is None:
            obj = manifests.service(endpoint, self._ns(), slot, self.service_type, self.port)
            try:
                self.api.call("create service", self.core.create_namespaced_service, self._ns(), obj)
                return
            except Exception as error:
                if getattr(error, "status", None) != 409:  # made meanwhile (an answer lost): patched
                    raise
        patch = {"spec": {"selector": {manifests.SLOT_LABEL: slot}}}
        name = manifests.service_name(endpoint)
        self._call("patch service", self.core.patch_namespaced_service, name, self._ns(), patch)

    splits_traffic = True

    def split(self, endpoint: str, slot: str, percent: int) -> EndpointState:
        now = self.current(endpoint)
        old = [s for s in now.traffic if s != slot]
        if not old:
            raise ServingFailed(f"endpoint {endpoint}: a canary needs a version serving beside it")
        serving_replicas = self._deployments(endpoint)[old[0]].spec.replicas or 1
        self._scale(endpoint, slot, manifests.canary_replicas(serving_replicas, percent))
        self._point_service(endpoint, None)
        return self.current(endpoint)

    def _scale(self, endpoint: str, slot: str, replicas: int) -> None:
        name = manifests.deployment_name(endpoint, slot)
        self._call(
            "scale deployment",
            self.apps.patch_namespaced_deployment,
            name,
            self._ns(),
            {"spec": {"replicas": replicas}},
        )
        self._wait_ready(endpoint, slot, replicas)

    def stop(self, endpoint: str, slot: str) -> None:
        self._delete_deployment(endpoint, slot)

    def _delete_deployment(self, endpoint: str, slot: str, wait: bool = False) -> bool:
        name = manifests.deployment_name(endpoint, slot)
        deleted = self._call(
            "delete deployment", self.apps.delete_namespaced_deployment, name, self._ns(), missing_ok=True
        )
        deadline = time.monotonic() + 60
        while wait and deleted is not None and self._pods(endpoint, slot) and time.monotonic() < deadline:
            time.sleep(0.5)
        return deleted is not None

    def undeploy(self, endpoint: str) -> bool:
        checked_endpoint(endpoint)
        removed = [self._delete_deployment(endpoint, slot) for slot in SLOTS]
        for kind, name in (
            ("service", manifests.service_name(endpoint)),
            ("secret", manifests.secret_name(endpoint)),
            ("config_map", manifests.config_map_name(endpoint)),
        ):
            delete = getattr(self.core, f"delete_namespaced_{kind}")
            removed.append(
                self._call(f"delete {kind}", delete, name, self._ns(), missing_ok=True) is not None
            )
        return any(removed)

    # -- one deploy at a time -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self, endpoint: str) -> Iterator[None]:
        lease = LeaseLock(
            self.hook.api_client, self._ns(), manifests.lease_name(checked_endpoint(endpoint)), self.api
        )
        with lease:
            yield


def _with_registry(version: ServedVersion, registry_uri: str) -> ServedVersion:
    from dataclasses import replace

    from airflow_provider_dnntrain.tracking import split_credentials

    target = split_credentials(registry_uri)
    return replace(
        version,
        registry_uri=target.uri,
        registry_credentials=dict(target.credentials) or version.registry_credentials,
    )
