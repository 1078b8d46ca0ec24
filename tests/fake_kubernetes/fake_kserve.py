"""The fake cluster's KServe: ``InferenceService``s (``serving.kserve.io/v1beta1``) served as KServe's
controller and Knative Serving serve them in serverless mode, in short:

- admission: the object checked against KServe's SDK models (``tests/kserve_schema.py``), and its model
  format one this cluster has a runtime for (``mlflow``: MLServer's MLflow runtime);
- a **revision** (``<isvc>-predictor-NNNNN``) each time the predictor changes other than in its
  ``canaryTrafficPercent``: a Deployment whose pods copy ``storageUri`` into /mnt/models (the storage
  initializer) and serve it (``fake_mlserver.py`` standing in for both images), ready once
  ``/v2/health/ready`` answers;
- **traffic**, as in KServe's canary rollout: a ready new revision takes all of it, unless
  ``canaryTrafficPercent`` is set, when it takes that share and the last rolled-out revision the rest
  (0: none, a rollback); while it is not ready, traffic stays where it was; a revision that failed is
  reported (``LatestDeploymentReady: False, RevisionFailed``); revisions that get no traffic and are
  not the latest are scaled away;
- the InferenceService's address: a Service of its name whose connections go to a revision chosen by
  those shares (then one of its ready pods); ``status.url`` names it. Deleting the InferenceService
  deletes what it owns.
"""

from __future__ import annotations

import asyncio
import itertools
import sys
from pathlib import Path

from fake_serving import APPS, ServingControllers, count_generation

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the schema checks
from kserve_schema import KServeSchemaError, validate_inference_service  # noqa: E402

KSERVE = "apis/serving.kserve.io/v1beta1"
ISVC_LABEL = "serving.kserve.io/inferenceservice"
REVISION_LABEL = "serving.knative.dev/revision"
STORAGE_INITIALIZER = "kserve/storage-initializer"
MLSERVER = "seldonio/mlserver"
FAKE_MLSERVER = Path(__file__).with_name("fake_mlserver.py")
ENTRYPOINTS = {
    STORAGE_INITIALIZER: [sys.executable, str(FAKE_MLSERVER), "storage-initializer"],
    MLSERVER: [sys.executable, str(FAKE_MLSERVER), "serve"],
}
MODELS = "/mnt/models"


def admit_inference_service(obj: dict) -> str | None:
    try:
        validate_inference_service(obj)
    except KServeSchemaError as error:
        return str(error)
    predictor = obj["spec"]["predictor"]
    model_format = predictor["model"]["modelFormat"]["name"]
    if model_format != "mlflow":
        return f"spec.predictor.model: no runtime of this cluster supports model format {model_format}"
    if not 0 <= predictor.get("canaryTrafficPercent", 0) <= 100:
        return "spec.predictor.canaryTrafficPercent: must be between 0 and 100"
    return None


class KServeController(ServingControllers):
    """Mixed into the cluster: uses its ``store``, ``create`` and ``delete``."""

    turns: dict  # a Service -> its connections counted (the traffic split is spread over each 100)

    def inference_service_changed(self, key: tuple, old_spec: dict | None) -> None:
        isvc = self.store.objects.get(key)
        if isvc is None:
            return
        count_generation(isvc, old_spec)
        if old_spec is None:
            self.create(("api/v1", key[1], "services"), self.address_of(isvc))
        if old_spec is None or _template(old_spec) != _template(isvc["spec"]):
            self.new_revision(key, isvc)
        self.update_inference_service(key)

    def new_revision(self, key: tuple, isvc: dict) -> None:
        predictor = _status(isvc)
        number = int((predictor.get("latestCreatedRevision") or "-0").rsplit("-", 1)[1]) + 1
        revision = f"{key[3]}-predictor-{number:05d}"
        predictor["latestCreatedRevision"] = revision
        answer = self.create((APPS, key[1], "deployments"), self.revision_of(isvc, revision))
        if answer.status >= 300:
            print(f"fake KServe: revision {revision} refused: {answer.text}", flush=True)

    def revision_of(self, isvc: dict, revision: str) -> dict:
        name, spec = isvc["metadata"]["name"], isvc["spec"]["predictor"]
        labels = {ISVC_LABEL: name, REVISION_LABEL: revision, "component": "predictor"}
        mount = [{"name": "kserve-provision-location", "mountPath": MODELS}]
        fetch = {
            "name": "storage-initializer",
            "image": f"{STORAGE_INITIALIZER}:v0.15.0",
            "args": [spec["model"]["storageUri"], MODELS],
            "volumeMounts": mount,
        }
        environment = {
            "MLSERVER_MODEL_NAME": name,
            "MLSERVER_MODEL_URI": MODELS,
            "MLSERVER_HTTP_PORT": "8080",
        }
        server = {
            "name": "kserve-container",
            "image": f"{MLSERVER}:1.6.1",
            "env": [{"name": k, "value": v} for k, v in environment.items()],
            "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": 8080}},
            "resources": spec["model"].get("resources") or {},
            "volumeMounts": [{**mount[0], "readOnly": True}],
        }
        pod = {
            "initContainers": [fetch],
            "containers": [server],
            "volumes": [{"name": "kserve-provision-location", "emptyDir": {}}],
        }
        if spec.get("serviceAccountName"):
            pod["serviceAccountName"] = spec["serviceAccountName"]
        meta = {"name": f"{revision}-deployment", "labels": labels, "ownerReferences": [_owner(isvc)]}
        template = {"metadata": {"labels": labels}, "spec": pod}
        replicas = spec.get("minReplicas", 1)
        spec = {"replicas": replicas, "selector": {"matchLabels": labels}, "template": template}
        return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": spec}

    def address_of(self, isvc: dict) -> dict:
        name = isvc["metadata"]["name"]
        meta = {"name": name, "labels": {ISVC_LABEL: name}, "ownerReferences": [_owner(isvc)]}
        ports = [{"name": "http", "port": 80, "targetPort": 8080}]
        spec = {"type": "ClusterIP", "selector": {ISVC_LABEL: name}, "ports": ports}
        return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}

    def update_inference_service(self, key: tuple) -> None:
        isvc = self.store.objects.get(key)
        if isvc is None:
            return
        predictor = _status(isvc)
        latest = predictor["latestCreatedRevision"]
        deployment = self.store.objects.get((APPS, key[1], "deployments", f"{latest}-deployment"))
        ready = bool(deployment) and (deployment.get("status") or {}).get("readyReplicas", 0) >= 1
        if ready:
            predictor["latestReadyRevision"] = latest
            predictor["traffic"] = self.routes(predictor, latest, isvc["spec"]["predictor"])
        failed = None if ready or not deployment else self.revision_failure(deployment, latest)
        serving = bool(predictor.get("traffic"))
        isvc["status"].update(
            url=f"http://{key[3]}.{key[1]}.svc.cluster.local",
            observedGeneration=isvc["metadata"]["generation"],
            conditions=[
                _condition("LatestDeploymentReady", ready, failed),
                _condition("PredictorReady", serving),
                _condition("Ready", serving),
            ],
        )
        self.store.put(key, isvc, "MODIFIED")
        self.scale_away_unrouted(key, isvc)

    def routes(self, predictor: dict, latest: str, spec: dict) -> list[dict]:
        rolled, canary = predictor.get("latestRolledoutRevision"), spec.get("canaryTrafficPercent")
        if canary is None or rolled in (None, latest):
            if rolled != latest:
                predictor["previousRolledoutRevision"] = rolled
                predictor["latestRolledoutRevision"] = latest
            return [{"revisionName": latest, "percent": 100, "latestRevision": True, "tag": "latest"}]
        return [
            {"revisionName": rolled, "percent": 100 - canary, "latestRevision": False, "tag": "prev"},
            {"revisionName": latest, "percent": canary, "latestRevision": True, "tag": "latest"},
        ]

    def revision_failure(self, deployment: dict, revision: str) -> str | None:
        for _, pod in self.owned_pods(deployment):
            status = pod.get("status") or {}
            for container in [
                *(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or []),
            ]:
                ended = (container.get("state") or {}).get("terminated") or {}
                if ended.get("exitCode"):
                    return (
                        f'Revision "{revision}" failed with message: Container failed with: '
                        f"{container['name']} exited {ended['exitCode']} ({ended.get('reason')})"
                    )
        return None

    def scale_away_unrouted(self, key: tuple, isvc: dict) -> None:
        predictor = _status(isvc)
        routed = {t["revisionName"] for t in predictor.get("traffic") or []}
        kept = routed | {predictor["latestCreatedRevision"]}
        for deployment_key, deployment in list(self.store.objects.items()):
            labels = deployment["metadata"].get("labels") or {}
            mine = deployment_key[:3] == (APPS, key[1], "deployments") and labels.get(ISVC_LABEL) == key[3]
            if mine and labels.get(REVISION_LABEL) not in kept:
                asyncio.ensure_future(self.delete(deployment_key))

    def pod_status_changed(self, pod: dict) -> None:
        super().pod_status_changed(pod)
        name = (pod["metadata"].get("labels") or {}).get(ISVC_LABEL)
        if name:
            self.update_inference_service((KSERVE, pod["metadata"]["namespace"], "inferenceservices", name))

    def routed(self, service_key: tuple, chosen: list) -> list:
        """An InferenceService's connection: to a revision by its share of the traffic."""
        service = self.store.objects.get(service_key) or {}
        name = (service.get("metadata", {}).get("labels") or {}).get(ISVC_LABEL)
        isvc = self.store.objects.get((KSERVE, service_key[1], "inferenceservices", name)) if name else None
        if isvc is None:
            return chosen
        traffic = [t for t in _status(isvc).get("traffic") or [] if t["percent"] > 0]
        if not traffic:
            return []
        turn = (next(self.turns.setdefault(service_key, itertools.count())) * 61) % 100  # 100 spread turns
        edge = itertools.accumulate(t["percent"] for t in traffic)
        revision = next(t["revisionName"] for t, upto in zip(traffic, edge, strict=True) if turn < upto)
        labels = {r.key: self.store.objects[r.key]["metadata"]["labels"] for r in chosen}
        return [r for r in chosen if labels[r.key].get(REVISION_LABEL) == revision]


def _template(spec: dict) -> dict:
    """What makes a revision: the predictor but its traffic percentage."""
    return {k: v for k, v in spec["predictor"].items() if k != "canaryTrafficPercent"}


def _status(isvc: dict) -> dict:
    return isvc.setdefault("status", {}).setdefault("components", {}).setdefault("predictor", {})


def _owner(isvc: dict) -> dict:
    meta = isvc["metadata"]
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
    }


def _condition(kind: str, true: bool, failure: str | None = None) -> dict:
    if true:
        return {"type": kind, "status": "True"}
    if failure:
        return {"type": kind, "status": "False", "reason": "RevisionFailed", "message": failure}
    return {"type": kind, "status": "Unknown"}
