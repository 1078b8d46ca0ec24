"""DockerServing in real Airflow runs: registered versions served by a container of their endpoint on
the real daemon, called at the published port with and without the endpoint's key, rolled forward
blue/green under load, refused when the smoke test fails, served again after the container's
supervisor is killed (the daemon restarts the container), serialised by the daemon's lock, and taken
down leaving no container and no volume.

The tests run in order, on one endpoint ("tiny-docker") and two versions of a model whose predictions
are each row's sum times its scale (2 and 3)."""

from __future__ import annotations

import json
from pathlib import Path

import endpoint_client
import pytest
from airflow_helpers import load_dag, task_instance, wait_for, xcom

from airflow_provider_dnntrain.launchers import DockerServing
from airflow_provider_dnntrain.operators.deploy import key_variable

DOCKER_DAGS = Path(__file__).resolve().parents[2] / "docker_dags"
ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]  # sums 6 and 4
ENDPOINT = "tiny-docker"
CONTAINER = DockerServing.container_name(ENDPOINT)


@pytest.fixture(scope="module")
def versions(tiny_versions, docker_daemon):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DOCKER_HOST", docker_daemon.base_url)
        yield tiny_versions
        DockerServing().undeploy(ENDPOINT)  # what a failed test left


def deploy(version: int, dag_id: str = "dnntrain_docker_deploy"):
    return load_dag(DOCKER_DAGS, dag_id).test(run_conf={"model": f"models:/tiny-served/{version}"})


@pytest.fixture(scope="module")
def scoring_uri(versions):
    dag_run = deploy(versions[2.0])
    assert dag_run.state == "success"
    return xcom(dag_run, "deploy")["scoring_uri"]


def ask(scoring_uri: str, key: str | None):
    return endpoint_client.ask(scoring_uri, ROWS, key)


def endpoint_key() -> str:
    from airflow.models import Variable

    return Variable.get(key_variable(ENDPOINT))


def status() -> dict:
    serving = DockerServing()
    return json.loads(serving._read_text(f"{serving.folder_path(ENDPOINT)}/status.json"))


def test_a_version_is_served_by_the_endpoint_s_container_behind_its_key(docker_daemon, versions, scoring_uri):
    assert scoring_uri.startswith("http://127.0.0.1:")  # the port published on the daemon's host
    assert ask(scoring_uri, endpoint_key()) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")
    for wrong in (None, "not-the-key"):
        assert ask(scoring_uri, wrong)[0] == 401
    inspected = json.loads(docker_daemon.docker("inspect", CONTAINER).stdout)[0]
    assert inspected["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert endpoint_key() not in json.dumps(inspected)  # the key's hash is in the volume, not the spec


def test_a_new_version_takes_over_blue_green_while_requests_keep_coming(versions, scoring_uri):
    key = endpoint_key()
    answers = endpoint_client.asked_during(
        lambda: ask(scoring_uri, key), lambda: succeeded(deploy(versions[3.0]))
    )
    old, new = f"tiny-served/{versions[2.0]}", f"tiny-served/{versions[3.0]}"
    endpoint_client.assert_switched_once(answers, old, new)
    assert [s["version"] for s in status()["slots"].values()] == [new]


def succeeded(dag_run) -> None:
    assert dag_run.state == "success"


def test_a_failed_smoke_test_leaves_the_old_version_serving(versions, scoring_uri, capfd):
    dag_run = deploy(versions[2.0], "dnntrain_docker_deploy_wrong_rows")
    assert task_instance(dag_run, "deploy").state == "failed"
    assert "smoke test: the rows do not suit the model" in "".join(capfd.readouterr())
    assert ask(scoring_uri, endpoint_key())[2] == f"tiny-served/{versions[3.0]}"
    assert len(status()["slots"]) == 1


def test_a_killed_supervisor_s_container_is_started_again_and_serves(docker_daemon, versions, scoring_uri):
    supervisor = status()["pid"]
    # The exec may be ended with the container it ends (137): whether it is, is not the question.
    docker_daemon.docker(
        "exec", CONTAINER, "python", "-c", f"import os; os.kill({supervisor}, 9)", check=False
    )
    restarts = lambda: int(docker_daemon.docker("inspect", "-f", "{{.RestartCount}}", CONTAINER).stdout)  # noqa: E731
    wait_for(lambda: restarts() >= 1, 60, "the daemon to start the container again")
    wait_for(lambda: ask(scoring_uri, endpoint_key())[0] == 200, 60, "the endpoint to answer again")
    assert ask(scoring_uri, endpoint_key())[2] == f"tiny-served/{versions[3.0]}"


def test_two_deploys_of_one_endpoint_go_one_after_the_other(versions):
    endpoint_client.assert_one_holder_at_a_time(DockerServing(), DockerServing(), ENDPOINT)


def test_undeploying_leaves_no_container_and_no_volume(docker_daemon, versions, scoring_uri):
    assert load_dag(DOCKER_DAGS, "dnntrain_docker_undeploy").test().state == "success"
    names = docker_daemon.docker("ps", "-a", "--format", "{{.Names}}").stdout.split()
    assert not [name for name in names if name.startswith(CONTAINER)]
    assert CONTAINER not in docker_daemon.docker("volume", "ls", "-q").stdout.split()
    assert ask(scoring_uri, endpoint_key())[0] == 0
    assert DockerServing().undeploy(ENDPOINT) is False
