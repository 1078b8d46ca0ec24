"""An endpoint's objects on Kubernetes (pure): a Deployment per slot (blue/green), the Service that
sends the endpoint's traffic to the active slot's pods, a Secret with what the servers may know (the
key's hash, the registry's address and credentials), a ConfigMap with the model server, and the Lease
that serialises deploys; and KServe's ``InferenceService`` form of the same version.

Each pod fetches its version from the registry in an init container, then serves it with MLflow's
scoring server behind the endpoint's key; ``GET /ping`` is its readiness and liveness probe.
"""

from __future__ import annotations

import math
from pathlib import Path

from airflow_provider_dnntrain.backends.common import model_server
from airflow_provider_dnntrain.backends.serving import ServedVersion

ENDPOINT_LABEL = "dnntrain.io/endpoint"
SLOT_LABEL = "dnntrain.io/slot"
VERSION_ANNOTATION = "dnntrain.io/model-version"
SERVER_PORT = 8080
SERVER_DIR = "/dnntrain/server"
MODEL_DIR = "/dnntrain/model"
KSERVE_API = "serving.kserve.io/v1beta1"


def service_name(endpoint: str) -> str:
    return endpoint  # a DNS label: clients call http://<endpoint>.<namespace>.svc.cluster.local


def deployment_name(endpoint: str, slot: str) -> str:
    return f"{endpoint}-{slot}"


def secret_name(endpoint: str) -> str:
    return f"{endpoint}-dnntrain-endpoint"


def config_map_name(endpoint: str) -> str:
    return f"{endpoint}-dnntrain-server"


def lease_name(endpoint: str) -> str:
    return f"{endpoint}-dnntrain-deploy"


def _labels(endpoint: str, slot: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/managed-by": "dnntrain", ENDPOINT_LABEL: endpoint}
    return {**labels, SLOT_LABEL: slot} if slot else labels


def _meta(name: str, namespace: str, endpoint: str, slot: str | None = None) -> dict:
    return {"name": name, "namespace": namespace, "labels": _labels(endpoint, slot)}


def secret(endpoint: str, namespace: str, key_hash: str, version: ServedVersion) -> dict:
    """What the servers may know: the key's hash (never the key), and how to reach the registry."""
    data = {model_server.KEY_HASH_VAR: key_hash, "MLFLOW_TRACKING_URI": version.registry_uri}
    data.update(version.registry_credentials)
    meta = _meta(secret_name(endpoint), namespace, endpoint)
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta, "type": "Opaque", "stringData": data}


def config_map(endpoint: str, namespace: str) -> dict:
    meta = _meta(config_map_name(endpoint), namespace, endpoint)
    code = Path(model_server.__file__).read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"model_server.py": code}}


def resources_of(version: ServedVersion, override: dict | None) -> dict:
    """The container's resources: ``override``, else the version's resource configuration."""
    if override is not None:
        return override
    wanted = version.resources
    requests, limits = {}, {}
    if wanted.get("cpu"):
        requests["cpu"] = f"{math.ceil(float(wanted['cpu']) * 1000)}m"
    if wanted.get("memory_in_gb"):
        requests["memory"] = limits["memory"] = f"{math.ceil(float(wanted['memory_in_gb']) * 1024)}Mi"
    if wanted.get("gpu"):
        limits["nvidia.com/gpu"] = str(int(wanted["gpu"]))
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def deployment(
    endpoint: str,
    namespace: str,
    slot: str,
    version: ServedVersion,
    *,
    image: str,
    python: str,
    replicas: int,
    resources: dict,
    pod_options: dict | None = None,
) -> dict:
    """The slot's pods: the version fetched by an init container, then served on ``SERVER_PORT``."""
    from_secret = {"secretRef": {"name": secret_name(endpoint)}}
    mounts = [{"name": "server", "mountPath": SERVER_DIR}, {"name": "model", "mountPath": MODEL_DIR}]
    served = f"{MODEL_DIR}/served"
    probe = {"httpGet": {"path": "/ping", "port": SERVER_PORT}, "periodSeconds": 2, "timeoutSeconds": 5}
    fetch = {
        "name": "fetch-model",
        "image": image,
        "command": [python, f"{SERVER_DIR}/model_server.py", "fetch", version.model_uri, served],
        "envFrom": [from_secret],
        "volumeMounts": mounts,
    }
    server = {
        "name": "server",
        "image": image,
        "command": [python, f"{SERVER_DIR}/model_server.py", served, f"--port={SERVER_PORT}"],
        "env": [{"name": model_server.VERSION_VAR, "value": version.label}],
        "envFrom": [from_secret],
        "ports": [{"name": "http", "containerPort": SERVER_PORT}],
        "volumeMounts": mounts,
        "readinessProbe": {**probe, "failureThreshold": 3},
        "livenessProbe": {**probe, "periodSeconds": 10, "failureThreshold": 6},
        "resources": resources,
    }
    volumes = [
        {"name": "server", "configMap": {"name": config_map_name(endpoint)}},
        {"name": "model", "emptyDir": {}},
    ]
    pod_spec = {"initContainers": [fetch], "containers": [server], "volumes": volumes, **(pod_options or {})}
    template = {"metadata": {"labels": _labels(endpoint, slot)}, "spec": pod_spec}
    meta = _meta(deployment_name(endpoint, slot), namespace, endpoint, slot)
    meta["annotations"] = {VERSION_ANNOTATION: version.label}
    spec = {"replicas": replicas, "selector": {"matchLabels": _labels(endpoint, slot)}, "template": template}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}


def service(endpoint: str, namespace: str, slot: str | None, service_type: str, port: int) -> dict:
    """The endpoint's address: its traffic to ``slot``'s pods (None: every slot's, a canary)."""
    spec = {
        "type": service_type,
        "selector": _labels(endpoint, slot),
        "ports": [{"name": "http", "port": port, "targetPort": SERVER_PORT}],
    }
    meta = _meta(service_name(endpoint), namespace, endpoint)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def canary_replicas(serving_replicas: int, percent: int) -> int:
    """The new slot's replicas beside ``serving_replicas`` old ones for about ``percent`` of the
    traffic (a Service spreads connections over pods evenly): at least one."""
    return max(1, round(serving_replicas * percent / (100 - percent)))


def inference_service(
    endpoint: str,
    namespace: str,
    version: ServedVersion,
    *,
    storage_uri: str,
    resources: dict,
    canary_traffic_percent: int | None = None,
    service_account: str | None = None,
    min_replicas: int = 1,
) -> dict:
    """KServe's form: an ``InferenceService`` whose predictor is the version as an MLflow model
    (``modelFormat: mlflow``, served by KServe's MLflow runtime) fetched from ``storage_uri``."""
    predictor: dict = {
        "minReplicas": min_replicas,
        "model": {
            "modelFormat": {"name": "mlflow"},
            "protocolVersion": "v2",
            "storageUri": storage_uri,
            "resources": resources,
        },
    }
    if canary_traffic_percent is not None:
        predictor["canaryTrafficPercent"] = canary_traffic_percent
    if service_account:
        predictor["serviceAccountName"] = service_account
    meta = _meta(endpoint, namespace, endpoint)
    meta["annotations"] = {VERSION_ANNOTATION: version.label}
    spec = {"predictor": predictor}
    return {"apiVersion": KSERVE_API, "kind": "InferenceService", "metadata": meta, "spec": spec}
