"""KServeServing in real Airflow runs on the fake cluster's KServe (``tests/fake_kubernetes/fake_kserve.py``):
the version applied as an InferenceService whose revision's pods fetch its files (``storageUri``) and serve
them with the MLflow runtime, called by a client on the pods' network at the address ``status.url`` names;
a canary that KServe's ``canaryTrafficPercent`` splits, moved up by a later deploy; a version whose
revision fails refused while the old one serves; undeploy leaving nothing.

The tests run in order, on one endpoint ("tiny-kserve") and the versions of "tiny-served" (each predicts
a row's sum times its scale: 2, 3 and 1), told apart here by what they predict."""

from __future__ import annotations

import json
import urllib.request
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

import endpoint_client
import pytest
from airflow_helpers import load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.launchers import KServeServing

KUBERNETES_DAGS = Path(__file__).resolve().parents[2] / "kubernetes_dags"
ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]  # sums 6 and 4
ENDPOINT = "tiny-kserve"
NAMESPACE = "training"
KSERVE = "serving.kserve.io/v1beta1"


@pytest.fixture(scope="module")
def versions(tiny_versions, connection):
    yield tiny_versions
    serving = KServeServing(kubernetes_conn_id="kubernetes_fake")
    with serving.locked(ENDPOINT):  # what a failed test left
        serving.undeploy(ENDPOINT)


def deploy(version: int, canary: int | str = ""):
    conf = {"model": f"models:/tiny-served/{version}", "canary": str(canary)}
    return load_dag(KUBERNETES_DAGS, "dnntrain_kserve_deploy").test(run_conf=conf)


@pytest.fixture(scope="module")
def client(cluster, versions):
    """A client on the pods' network, at the address the InferenceService's URL names."""
    dag_run = deploy(versions[2.0])
    assert dag_run.state == "success"
    result = xcom(dag_run, "deploy")
    assert urlsplit(result["scoring_uri"]).hostname == f"{ENDPOINT}.{NAMESPACE}.svc.cluster.local"
    with cluster.service_reached(ENDPOINT) as base:
        yield base


def scale_served(base: str) -> float | None:
    """Which version answered: its scale, from what it predicted (None: no answer)."""
    status, predictions, _ = endpoint_client.ask(f"{base}/invocations", ROWS, None)
    return predictions[0][0] / 6 if status == 200 else None


def test_a_version_is_an_inference_service_whose_revision_serves_it(cluster, versions, client):
    assert scale_served(client) == 2.0
    (isvc,) = cluster.objects("inferenceservices", group=KSERVE)
    model = isvc["spec"]["predictor"]["model"]
    registry = tracking.client(tracking.resolve_tracking_uri())
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == registry.get_model_version_download_uri("tiny-served", str(versions[2.0]))
    assert model["resources"]["requests"] == {"cpu": "500m", "memory": "1024Mi"}
    v2 = {"inputs": [{"name": "rows", "shape": [2, 3], "datatype": "FP32", "data": sum(ROWS, [])}]}
    request = urllib.request.Request(f"{client}/v2/models/{ENDPOINT}/infer", data=json.dumps(v2).encode())
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer)["outputs"][0]["data"] == [12.0, 8.0]


def test_a_canary_is_split_by_kserve_until_a_later_deploy_finishes_it(cluster, versions, client):
    dag_run = deploy(versions[3.0], canary=50)
    assert dag_run.state == "success"
    old, new = f"tiny-served/{versions[2.0]}", f"tiny-served/{versions[3.0]}"
    result = xcom(dag_run, "deploy")
    assert result["traffic"] == {old: 50, new: 50} and result["key_variable"] is None
    served = Counter(scale_served(client) for _ in range(40))
    assert set(served) == {2.0, 3.0} and min(served.values()) >= 15, served
    (isvc,) = cluster.objects("inferenceservices", group=KSERVE)
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 50
    registry = tracking.client(tracking.resolve_tracking_uri())
    assert int(registry.get_model_version_by_alias("tiny-served", "kserve-champion").version) == versions[2.0]
    assert xcom(deploy(versions[3.0], canary=100), "deploy")["traffic"] == {new: 100}
    assert {scale_served(client) for _ in range(10)} == {3.0}
    assert int(registry.get_model_version_by_alias("tiny-served", "kserve-champion").version) == versions[3.0]


def test_a_version_whose_revision_fails_is_refused_and_the_old_one_serves(cluster, versions, client, capfd):
    with endpoint_client.broken("tiny-served", versions[1.0]):
        dag_run = deploy(versions[1.0])
    assert task_instance(dag_run, "deploy").state == "failed"
    said = "".join(capfd.readouterr())
    assert "never answered /v2/health/ready: pod tiny-kserve-predictor-" in said
    assert "container kserve-container: exited 1 (Error); its log ends:\nTraceback" in said
    assert {scale_served(client) for _ in range(10)} == {3.0}
    (isvc,) = cluster.objects("inferenceservices", group=KSERVE)
    assert f"/{versions[3.0]}" in isvc["metadata"]["annotations"]["dnntrain.io/model-version"]
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


def test_undeploy_leaves_nothing(cluster, versions, client):
    assert load_dag(KUBERNETES_DAGS, "dnntrain_kserve_undeploy").test().state == "success"
    assert cluster.objects("inferenceservices", group=KSERVE) == []
    owned = "?labelSelector=serving.kserve.io/inferenceservice=" + ENDPOINT
    for kind, group in (("deployments", "apps/v1"), ("services", "")):
        assert cluster.objects(kind + owned, group=group) == [], kind
    assert scale_served(client) is None
