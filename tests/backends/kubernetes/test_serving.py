"""KubernetesServing in real Airflow runs on the fake cluster: a Deployment per version whose pods fetch
the version from the registry and pass their readiness probe, behind the endpoint's Service, called by
a client on the pods' network through the Service's address (with and without the key); blue/green
under load; a broken version refused with its pod's last words while the old one serves; a canary
moved up by a later deploy; the smoke test through ``pods/portforward``; deploys serialised by a
Lease; undeploy leaving nothing.

The tests run in order, on one endpoint ("tiny-k8s") and versions of a model whose predictions are each
row's sum times its scale (2, 3 and 1)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from urllib.parse import urlsplit

import endpoint_client
import pytest
import yaml
from airflow_helpers import load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.launchers import KubernetesServing
from airflow_provider_dnntrain.operators.deploy import key_variable

KUBERNETES_DAGS = Path(__file__).resolve().parents[2] / "kubernetes_dags"
ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]  # sums 6 and 4
ENDPOINT = "tiny-k8s"
NAMESPACE = "training"


@pytest.fixture(scope="module")
def versions(tiny_versions, connection):
    yield tiny_versions
    serving = KubernetesServing(kubernetes_conn_id="kubernetes_fake")
    with serving.locked(ENDPOINT):  # what a failed test left
        serving.undeploy(ENDPOINT)


def deploy(version: int, canary: int | str = ""):
    conf = {"model": f"models:/tiny-served/{version}", "canary": str(canary)}
    return load_dag(KUBERNETES_DAGS, "dnntrain_kubernetes_deploy").test(run_conf=conf)


def api(cluster, path: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{cluster.port}{path}", data=data)
    request.add_header("Authorization", "Bearer fake-cluster-token")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return json.load(answer)


def owned(cluster, kind: str) -> list[dict]:
    prefix = "apis/apps/v1" if kind == "deployments" else "api/v1"
    found = api(
        cluster, f"/{prefix}/namespaces/{NAMESPACE}/{kind}?labelSelector=dnntrain.io/endpoint={ENDPOINT}"
    )
    return found["items"]


@pytest.fixture(scope="module")
def client(cluster, versions):
    """A client on the pods' network, at the Service's address (what its DNS name resolves to)."""
    dag_run = deploy(versions[2.0])
    assert dag_run.state == "success"
    result = xcom(dag_run, "deploy")
    assert urlsplit(result["scoring_uri"]).hostname == f"{ENDPOINT}.{NAMESPACE}.svc.cluster.local"
    with cluster.service_reached(ENDPOINT) as base:
        yield f"{base}/invocations"


def endpoint_key() -> str:
    from airflow.models import Variable

    return Variable.get(key_variable(ENDPOINT))


def ask(url: str, key: str | None = None):
    return endpoint_client.ask(url, ROWS, key if key is not None else endpoint_key())


def test_a_version_serves_from_pods_that_fetched_it_behind_the_key(cluster, versions, client):
    assert ask(client) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")
    assert ask(client, "")[0] == 401 and ask(client, "not-the-key")[0] == 401
    (deployment,) = owned(cluster, "deployments")
    pod = deployment["spec"]["template"]["spec"]
    server = pod["containers"][0]
    assert server["readinessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert server["livenessProbe"]["httpGet"] == {"path": "/ping", "port": 8080}
    assert server["resources"] == {
        "requests": {"cpu": "500m", "memory": "1024Mi"},
        "limits": {"memory": "1024Mi"},
    }
    assert pod["initContainers"][0]["command"][-2] == f"models:/tiny-served/{versions[2.0]}"
    everything = json.dumps(
        [owned(cluster, kind) for kind in ("deployments", "secrets", "configmaps", "pods")]
    )
    assert endpoint_key() not in everything  # the Secret has its hash only


def test_a_new_version_takes_over_blue_green_while_requests_keep_coming(cluster, versions, client):
    def deployed() -> None:
        assert deploy(versions[3.0]).state == "success"

    key = endpoint_key()  # read here: Airflow's in-process task runner is not for several threads
    answers = endpoint_client.asked_during(lambda: ask(client, key), deployed)
    endpoint_client.assert_switched_once(
        answers, f"tiny-served/{versions[2.0]}", f"tiny-served/{versions[3.0]}"
    )
    assert [d["metadata"]["name"] for d in owned(cluster, "deployments")] == [f"{ENDPOINT}-green"]


def test_a_broken_version_is_refused_with_its_pods_words_and_the_old_one_serves(
    cluster, versions, client, capfd
):
    with endpoint_client.broken("tiny-served", versions[1.0]):
        dag_run = deploy(versions[1.0])
    assert task_instance(dag_run, "deploy").state == "failed"
    said = "".join(capfd.readouterr())
    assert "the new version never answered /ping: pod tiny-k8s-blue-" in said and "exited 1" in said
    assert ask(client)[2] == f"tiny-served/{versions[3.0]}"
    assert [d["metadata"]["name"] for d in owned(cluster, "deployments")] == [f"{ENDPOINT}-green"]


def test_a_canary_takes_part_of_the_traffic_until_a_later_deploy_finishes_it(cluster, versions, client):
    dag_run = deploy(versions[1.0], canary=50)
    assert dag_run.state == "success"
    old, new = f"tiny-served/{versions[3.0]}", f"tiny-served/{versions[1.0]}"
    assert xcom(dag_run, "deploy")["traffic"] == {old: 50, new: 50}
    served = Counter(ask(client)[2] for _ in range(40))
    assert set(served) == {old, new} and min(served.values()) >= 10, served
    registry = tracking.client(tracking.resolve_tracking_uri())
    assert int(registry.get_model_version_by_alias("tiny-served", "k8s-champion").version) == versions[3.0]
    dag_run = deploy(versions[1.0], canary=100)
    assert xcom(dag_run, "deploy")["traffic"] == {new: 100}
    assert {ask(client)[2] for _ in range(10)} == {new}
    assert len(owned(cluster, "deployments")) == 1
    assert int(registry.get_model_version_by_alias("tiny-served", "k8s-champion").version) == versions[1.0]


def test_two_deploys_of_one_endpoint_go_one_after_the_other(connection):
    endpoint_client.assert_one_holder_at_a_time(
        KubernetesServing(kubernetes_conn_id="kubernetes_fake"),
        KubernetesServing(kubernetes_conn_id="kubernetes_fake"),
        ENDPOINT,
    )


def documented_role() -> list[dict]:
    page = (Path(__file__).resolve().parents[3] / "docs" / "deployment.md").read_text()
    block = re.search(r"```yaml\n(# dnntrain-serving-role\.yaml\n.*?)```", page, re.DOTALL).group(1)
    return yaml.safe_load(block)["rules"]


def test_deploys_go_through_an_api_server_that_errs_loses_answers_and_holds_to_the_documented_role(
    cluster, versions, client
):
    before = cluster.injected()  # the cluster's counts so far (it is shared with other modules)
    with cluster.misbehaving(documented_role(), error_rate=0.1, lose_answers=4):
        rolled_back = deploy(versions[3.0])
        canary = deploy(versions[2.0], canary=50)
        after = cluster.injected()
    assert [run.state for run in (rolled_back, canary)] == ["success"] * 2
    denied = Counter(after["denied"]) - Counter(before["denied"])
    injected = Counter(after["injected"]) - Counter(before["injected"])
    assert denied == Counter(), denied
    assert injected["500 after the change"] >= 4 and len(injected) > 1, injected
    served = {ask(client)[2] for _ in range(20)}
    assert served == {f"tiny-served/{versions[3.0]}", f"tiny-served/{versions[2.0]}"}


def test_the_lease_of_a_killed_deploy_is_taken_over_once_it_has_lapsed(cluster, connection):
    stale = (datetime.now(timezone.utc) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    spec = {"holderIdentity": "a-killed-task", "leaseDurationSeconds": 60, "renewTime": stale}
    lease = {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": f"{ENDPOINT}-dnntrain-deploy"},
        "spec": spec,
    }
    api(cluster, f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases", lease)
    started = time.monotonic()
    with KubernetesServing(kubernetes_conn_id="kubernetes_fake").locked(ENDPOINT):
        assert time.monotonic() - started < 10
    leases = api(cluster, f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases")["items"]
    assert leases == []  # released: the next deploy does not wait


def test_undeploy_leaves_nothing(cluster, versions, client):
    assert load_dag(KUBERNETES_DAGS, "dnntrain_kubernetes_undeploy").test().state == "success"
    for kind in ("deployments", "services", "secrets", "configmaps"):
        assert owned(cluster, kind) == [], kind
    leases = api(cluster, f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases")["items"]
    assert leases == []
    assert ask(client)[0] == 0
