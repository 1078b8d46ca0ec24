"""Endpoints on clusters that run KServe: the version as an ``InferenceService`` whose predictor is
KServe's MLflow runtime (``modelFormat: mlflow``, the v2 protocol and MLflow's ``/invocations``), which
fetches the version's files from ``storageUri``.

The rollout is KServe's own, driven the way its canary guide does: a new version is applied with
``canaryTrafficPercent: 0``, so its revision starts beside the one serving and gets no traffic; once it is
ready, the smoke test reaches one of its pods through the API server; then the percentage moves it (a
canary), or the field is removed (all of the traffic). A version that fails (its revision never ready,
or its check) is rolled back by applying the serving version's predictor again. Which version each
revision serves is kept in an annotation of the InferenceService. Deploys are serialised by a Lease.

KServe has no key of its own: callers are authenticated by the cluster's gateway (Istio, Authorino...).
"""

from __future__ import annotations

import json
import time
from functools import cached_property

from airflow_provider_dnntrain.backends.kubernetes import serving_manifests as manifests
from airflow_provider_dnntrain.backends.kubernetes.serving import KubernetesServing
from airflow_provider_dnntrain.backends.serving import (
    EndpointState,
    ServedVersion,
    ServingFailed,
    checked_endpoint,
)

GROUP, VERSION, PLURAL = "serving.kserve.io", "v1beta1", "inferenceservices"
REVISION_LABEL = "serving.knative.dev/revision"
REVISIONS_ANNOTATION = "dnntrain.io/revisions"  # {revision: {"version": label, "model": predictor.model}}
# What KServe's storage initializer fetches from (Azure's blobs are https://).
STORAGE_SCHEMES = (
    "s3://",
    "gs://",
    "https://",
    "http://",
    "pvc://",
    "hdfs://",
    "webhdfs://",
    "hf://",
    "file://",
)


class KServeServing(KubernetesServing):
    """Models served by KServe on the cluster of ``kubernetes_conn_id`` (``in_cluster``, ``config_file``,
    ``cluster_context`` as ``KubernetesHook`` takes them), in ``namespace`` (default: the connection's).

    ``storage_uri``: where KServe fetches a version, ``{name}`` and ``{version}`` filled in (default: the
    registry's location of the version's files, which must be one KServe's storage initializer reads:
    s3, gs, Azure blobs, http(s), pvc...). ``resources``: the predictor's (default: the version's resource
    configuration); ``min_replicas``; ``service_account``: the predictor's (its storage credentials).
    """

    requires_key = False
    splits_traffic = True
    server_port = 8080  # the runtime's container, in each of the revision's pods
    probe_path = "/v2/health/ready"

    def __init__(
        self,
        *,
        kubernetes_conn_id: str | None = "kubernetes_default",
        namespace: str | None = None,
        in_cluster: bool | None = None,
        config_file: str | None = None,
        cluster_context: str | None = None,
        storage_uri: str | None = None,
        resources: dict | None = None,
        min_replicas: int = 1,
        service_account: str | None = None,
        startup_timeout: float = 600,
        api_request_timeout: float = 30.0,
    ) -> None:
        super().__init__(
            kubernetes_conn_id=kubernetes_conn_id, namespace=namespace, in_cluster=in_cluster,
            config_file=config_file, cluster_context=cluster_context, replicas=min_replicas,
            resources=resources, startup_timeout=startup_timeout, api_request_timeout=api_request_timeout,
        )  # fmt: skip
        self.storage_uri = storage_uri
        self.service_account = service_account

    @cached_property
    def custom(self):
        from kubernetes.client import CustomObjectsApi

        return CustomObjectsApi(self.hook.api_client)

    def _pod_selector(self, endpoint: str, slot: str) -> str:
        return f"{REVISION_LABEL}={slot}"

    # -- the InferenceService ---------------------------------------------------------------------------

    def _read(self, endpoint: str) -> dict | None:
        read = self.custom.get_namespaced_custom_object
        return self._call(
            "read inferenceservice", read, GROUP, VERSION, self._ns(), PLURAL, endpoint, missing_ok=True
        )

    def _patch(self, endpoint: str, patch: dict) -> None:
        patched = self.custom.patch_namespaced_custom_object
        self._call("patch inferenceservice", patched, GROUP, VERSION, self._ns(), PLURAL, endpoint, patch)

    def current(self, endpoint: str) -> EndpointState:
        obj = self._read(checked_endpoint(endpoint)) or {}
        predictor = _predictor_status(obj)
        revisions = _revisions(obj)
        routes = predictor.get("traffic") or []
        traffic = {t["revisionName"]: t["percent"] for t in routes if t.get("percent")}
        known = [*traffic, predictor.get("latestCreatedRevision")]
        slots = {rev: revisions[rev]["version"] for rev in known if rev in revisions}
        primary = max(traffic, key=traffic.get) if traffic else None
        status = obj.get("status") or {}
        base = status.get("url") or (status.get("address") or {}).get("url")
        base = base or f"http://{endpoint}.{self._ns()}.svc.cluster.local"
        return EndpointState(
            endpoint=endpoint,
            scoring_uri=f"{base}/invocations",
            health_uri=f"{base}{self.probe_path}",
            serving=slots.get(primary) if primary else None,
            state="serving" if primary in slots else "absent",
            slots=slots,
            traffic={rev: share for rev, share in traffic.items() if rev in slots},
        )

    # -- a version started, checked, switched to ------------------------------------------------------------

    def start(self, endpoint: str, version: ServedVersion, key_hash: str) -> str:
        obj = self._read(endpoint)
        serving = bool(obj) and any(t.get("percent") for t in _predictor_status(obj).get("traffic") or [])
        if serving:
            obj = self._adopted(endpoint, obj)
        wanted = manifests.inference_service(
            endpoint, self._ns(), version, storage_uri=self._storage_of(version),
            resources=manifests.resources_of(version, self.resources),
            canary_traffic_percent=0 if serving else None,  # beside what serves, none of its traffic
            service_account=self.service_account, min_replicas=self.replicas,
        )  # fmt: skip
        if obj is None:
            create = self.custom.create_namespaced_custom_object
            self._call("create inferenceservice", create, GROUP, VERSION, self._ns(), PLURAL, wanted)
            was = None
        else:
            was = _predictor_status(obj).get("latestCreatedRevision")
            self._patch(endpoint, {"metadata": {"annotations": wanted["metadata"]["annotations"]},
                                   "spec": wanted["spec"]})  # fmt: skip
        try:
            return self._revision_ready(endpoint, was, version.label, wanted["spec"]["predictor"]["model"])
        except BaseException:
            self._restore(endpoint) if serving else self.undeploy(endpoint)
            raise

    def _adopted(self, endpoint: str, obj: dict) -> dict:
        """The InferenceService, its serving revision recorded (one applied by someone else: its spec's,
        when nothing changed since), so that a failure can go back to it."""
        predictor = _predictor_status(obj)
        routes = {t["revisionName"]: t.get("percent") or 0 for t in predictor["traffic"]}
        primary = max(routes, key=routes.get)
        if primary in _revisions(obj) or predictor.get("latestCreatedRevision") != primary:
            return obj
        label = (obj["metadata"].get("annotations") or {}).get(manifests.VERSION_ANNOTATION, "unknown")
        self._record(endpoint, obj, primary, label, obj["spec"]["predictor"]["model"])
        return self._read(endpoint)

    def _storage_of(self, version: ServedVersion) -> str:
        uri = (self.storage_uri or version.artifact_uri).format(name=version.name, version=version.version)
        if not uri.startswith(STORAGE_SCHEMES):
            raise ServingFailed(
                f"storage_uri: {version.label}'s files are at {uri!r}, which KServe's storage initializer "
                f"cannot fetch (it reads {', '.join(STORAGE_SCHEMES)}): keep the registry's artifacts "
                "there, or give storage_uri='s3://bucket/models/{name}/{version}'"
            )
        return uri

    def _revision_ready(self, endpoint: str, was: str | None, label: str, model: dict) -> str:
        """The revision the change made, once it is ready, recorded as serving ``label``."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            obj = self._read(endpoint) or {}
            predictor = _predictor_status(obj)
            made = predictor.get("latestCreatedRevision")
            seen = (obj.get("status") or {}).get("observedGeneration", 0)
            current = seen >= obj["metadata"].get("generation", 0)
            if current and made and made != was:
                if predictor.get("latestReadyRevision") == made:
                    self._record(endpoint, obj, made, label, model)
                    return made
                self._fail_if_failed(endpoint, obj, made)
            time.sleep(1)
        raise ServingFailed(
            f"endpoint {endpoint}: {label}'s revision was not ready within {self.startup_timeout:.0f} s"
        )

    def _fail_if_failed(self, endpoint: str, obj: dict, revision: str) -> None:
        for condition in (obj.get("status") or {}).get("conditions") or []:
            if condition["type"] == "LatestDeploymentReady" and condition["status"] == "False":
                self._fail_if_broken(endpoint, revision)  # with the container's last words, if it has some
                raise ServingFailed(
                    f"endpoint {endpoint}: revision {revision} failed: {condition.get('reason')}: "
                    f"{condition.get('message')}"
                )
        self._fail_if_broken(endpoint, revision)

    def _record(self, endpoint: str, obj: dict, revision: str, label: str, model: dict) -> None:
        """``revision`` serves ``label``; revisions neither serving nor latest forgotten."""
        traffic = {t["revisionName"] for t in _predictor_status(obj).get("traffic") or []}
        kept = {rev: seen for rev, seen in _revisions(obj).items() if rev in traffic}
        kept[revision] = {"version": label, "model": model}
        self._patch(endpoint, {"metadata": {"annotations": {REVISIONS_ANNOTATION: json.dumps(kept)}}})

    def _restore(self, endpoint: str) -> None:
        """The serving version's predictor applied again, all of the traffic to it (a rollback)."""
        now = self.current(endpoint)
        if not now.traffic:
            raise ServingFailed(
                f"endpoint {endpoint}: the serving revision's predictor is not known, so it is not applied "
                "again; canaryTrafficPercent keeps the traffic on it"
            )
        primary = max(now.traffic, key=now.traffic.get)
        obj = self._read(endpoint)
        was = _predictor_status(obj).get("latestCreatedRevision")
        model = _revisions(obj)[primary]["model"]
        annotations = {manifests.VERSION_ANNOTATION: now.serving}
        patch = {"spec": {"predictor": {"model": model, "canaryTrafficPercent": None}}}
        self._patch(endpoint, {"metadata": {"annotations": annotations}, **patch})
        self._revision_ready(endpoint, was, now.serving, model)

    def switch(self, endpoint: str, slot: str) -> EndpointState:
        latest = _predictor_status(self._read(endpoint)).get("latestCreatedRevision")
        # the latest revision: all of the traffic (no canary); the one before: none of it (rolled back)
        percent = None if slot == latest else 0
        self._patch(endpoint, {"spec": {"predictor": {"canaryTrafficPercent": percent}}})
        return self._traffic_moved(endpoint, slot, 100)

    def split(self, endpoint: str, slot: str, percent: int) -> EndpointState:
        self._patch(endpoint, {"spec": {"predictor": {"canaryTrafficPercent": percent}}})
        return self._traffic_moved(endpoint, slot, percent)

    def _traffic_moved(self, endpoint: str, slot: str, percent: int) -> EndpointState:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            now = self.current(endpoint)
            if now.traffic.get(slot, 0) == percent:
                return now
            time.sleep(0.5)
        raise ServingFailed(f"endpoint {endpoint}: KServe did not send {percent}% of the traffic to {slot}")

    def stop(self, endpoint: str, slot: str) -> None:
        """The latest revision: rolled back to the one serving beside it, or, serving alone (a first
        version that failed its check), removed. An older one: Knative scales it down itself once no
        traffic goes to it."""
        obj = self._read(endpoint)
        if not obj or slot != _predictor_status(obj).get("latestCreatedRevision"):
            return
        if any(rev != slot for rev in self.current(endpoint).traffic):
            self._restore(endpoint)
        else:
            self.undeploy(endpoint)

    def undeploy(self, endpoint: str) -> bool:
        delete = self.custom.delete_namespaced_custom_object
        gone = self._call("delete inferenceservice", delete, GROUP, VERSION, self._ns(), PLURAL,
                          checked_endpoint(endpoint), missing_ok=True)  # fmt: skip
        return gone is not None


def _predictor_status(obj: dict) -> dict:
    return ((obj.get("status") or {}).get("components") or {}).get("predictor") or {}


def _revisions(obj: dict) -> dict:
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    return json.loads(annotations.get(REVISIONS_ANNOTATION) or "{}")
