"""DeployModelOperator on the local backend, in real Airflow runs: registered versions served by real
scoring servers on this host, called over HTTP with and without the endpoint's key, rolled forward and
back blue/green under load, refused when broken, restarted when killed, gated, and taken down.

The tests run in order, on one endpoint ("tiny") and three versions of a model whose predictions are
each row's sum times its scale (2, 3 and 1; the scale is also the run's metric "score")."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import endpoint_client
import pytest
from airflow_helpers import TEST_DAGS, load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.launchers import LocalServing
from airflow_provider_dnntrain.operators.deploy import key_variable

ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]  # sums 6 and 4


@pytest.fixture(scope="module")
def versions(tiny_versions):
    yield tiny_versions
    LocalServing().undeploy("tiny")  # what a failed test left


def deploy(version: int, dag_id: str = "dnntrain_test_deploy"):
    return load_dag(TEST_DAGS, dag_id).test(run_conf={"model": f"models:/tiny-served/{version}"})


def endpoint_key() -> str:
    from airflow.models import Variable

    return Variable.get(key_variable("tiny"))


def ask(scoring_uri: str, key: str | None) -> tuple[int, list | None, str | None]:
    return endpoint_client.ask(scoring_uri, ROWS, key)


def assert_succeeded(dag_run) -> None:
    assert dag_run.state == "success"


def status() -> dict:
    return json.loads((LocalServing().folder("tiny") / "status.json").read_text())


def scoring_uri() -> str:
    return LocalServing().current("tiny").scoring_uri


def test_a_version_is_served_behind_its_key_and_promoted(versions, capfd):
    dag_run = deploy(versions[2.0])
    assert dag_run.state == "success"
    result = xcom(dag_run, "deploy")
    assert result["model_name"] == "tiny-served" and result["model_version"] == versions[2.0]
    assert result["state"] == "serving" and result["health_uri"].endswith("/ping")
    key = endpoint_key()
    assert ask(result["scoring_uri"], key) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")
    for wrong in (None, "not-the-key"):
        assert ask(result["scoring_uri"], wrong)[0] == 401
    with urllib.request.urlopen(result["health_uri"], timeout=10) as probe:
        assert probe.status == 200  # probes need no key
    client = tracking.client(tracking.resolve_tracking_uri())
    assert int(client.get_model_version_by_alias("tiny-served", "champion").version) == versions[2.0]
    assert key not in json.dumps(result) and key not in "".join(capfd.readouterr())


def test_deploying_the_serving_version_again_changes_nothing(versions, capfd):
    before = status()
    assert deploy(versions[2.0]).state == "success"
    assert "already serves tiny-served/" in "".join(capfd.readouterr())
    assert status() == before


def test_a_new_version_takes_over_blue_green_while_requests_keep_coming(versions):
    key, uri = endpoint_key(), scoring_uri()
    answers = endpoint_client.asked_during(
        lambda: ask(uri, key), lambda: assert_succeeded(deploy(versions[3.0]))
    )
    assert ask(uri, key) == (200, [[18.0], [12.0]], f"tiny-served/{versions[3.0]}")
    old, new = f"tiny-served/{versions[2.0]}", f"tiny-served/{versions[3.0]}"
    endpoint_client.assert_switched_once(answers, old, new)
    assert old in [a[2] for a in answers]
    assert list(status()["slots"].values())[0]["version"] == f"tiny-served/{versions[3.0]}"
    assert len(status()["slots"]) == 1  # the old version stopped


def test_a_version_short_of_the_champions_metric_is_skipped(versions, capfd):
    dag_run = deploy(versions[1.0], "dnntrain_test_deploy_gated")
    assert task_instance(dag_run, "deploy").state == "skipped"
    assert "has score=1.0, not better than champion" in "".join(capfd.readouterr())
    assert ask(scoring_uri(), endpoint_key())[2] == f"tiny-served/{versions[3.0]}"


def test_a_version_that_cannot_start_is_refused_and_the_old_one_keeps_serving(versions, capfd):
    with endpoint_client.broken("tiny-served", versions[1.0]):
        dag_run = deploy(versions[1.0])
    assert task_instance(dag_run, "deploy").state == "failed"
    assert "the new version never answered /ping" in "".join(capfd.readouterr())
    assert ask(scoring_uri(), endpoint_key()) == (200, [[18.0], [12.0]], f"tiny-served/{versions[3.0]}")
    assert len(status()["slots"]) == 1


def test_a_failed_smoke_test_leaves_the_old_version_serving(versions, capfd):
    dag_run = deploy(versions[2.0], "dnntrain_test_deploy_wrong_rows")
    assert task_instance(dag_run, "deploy").state == "failed"
    assert "smoke test: the rows do not suit the model" in "".join(capfd.readouterr())
    assert ask(scoring_uri(), endpoint_key())[2] == f"tiny-served/{versions[3.0]}"
    assert len(status()["slots"]) == 1


def test_a_version_registered_as_files_is_refused_before_anything_starts(versions, capfd):
    uri = tracking.resolve_tracking_uri()
    client = tracking.client(uri)
    run_id = client.get_model_version("tiny-served", str(versions[2.0])).run_id
    files = tracking.register_model(uri, run_id, "tiny-files", "model", {})  # the files as they are
    dag_run = load_dag(TEST_DAGS, "dnntrain_test_deploy").test(
        run_conf={"model": f"models:/tiny-files/{files}"}
    )
    assert task_instance(dag_run, "deploy").state == "failed"
    assert "is files, not a model MLflow loads" in "".join(capfd.readouterr())
    assert ask(scoring_uri(), endpoint_key())[2] == f"tiny-served/{versions[3.0]}"


def test_a_killed_server_is_started_again(versions):
    (slot,) = status()["slots"].values()
    os.kill(slot["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 60
    while (
        ask(scoring_uri(), endpoint_key())[0] != 200
        or status()["slots"][next(iter(status()["slots"]))]["starts"] < 2
    ):
        assert time.monotonic() < deadline, "the killed server was not started again"
        time.sleep(0.5)
    assert ask(scoring_uri(), endpoint_key()) == (200, [[18.0], [12.0]], f"tiny-served/{versions[3.0]}")


def test_rolling_back_is_deploying_the_previous_version(versions):
    assert deploy(versions[2.0]).state == "success"
    assert ask(scoring_uri(), endpoint_key()) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")


def test_undeploy_leaves_nothing(versions):
    serving = LocalServing()
    pids = [status()["pid"], *[slot["pid"] for slot in status()["slots"].values()]]
    uri = scoring_uri()
    assert load_dag(TEST_DAGS, "dnntrain_test_undeploy").test().state == "success"
    assert not serving.folder("tiny").exists()
    assert not [pid for pid in pids if Path(f"/proc/{pid}").exists()]
    assert ask(uri, None)[0] == 0
    from airflow.models import Variable

    assert Variable.get(key_variable("tiny"), default_var=None) is None
    assert serving.undeploy("tiny") is False  # nothing left to remove
    with serving.locked("tiny"):
        assert serving.current("tiny").state == "absent" and not serving.folder("tiny").exists()


def test_a_wrong_endpoint_or_model_is_refused_when_the_dag_is_parsed():
    from airflow_provider_dnntrain.operators import DeployModelOperator

    with pytest.raises(ValueError, match="endpoint: 'Tiny_Endpoint' is not a name"):
        DeployModelOperator(task_id="d", model="models:/m/1", endpoint="Tiny_Endpoint")
    with pytest.raises(ValueError, match="model: 'runs:/abc/model' is not models:/<name>/<version>"):
        DeployModelOperator(task_id="d", model="runs:/abc/model", endpoint="tiny")
    with pytest.raises(ValueError, match="metric: must_beat compares a metric"):
        DeployModelOperator(task_id="d", model="models:/m@champion", endpoint="tiny", must_beat="champion")
