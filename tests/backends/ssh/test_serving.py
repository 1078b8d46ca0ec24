"""SSHServing in real Airflow runs: registered versions served on a real sshd host (a network namespace
of its own), called by a client on the hosts' network with and without the endpoint's key, rolled
forward and back blue/green under load, refused when broken, restarted when killed, outliving the
deploy task's SSH sessions, serialised by a lock held on the host, and taken down leaving nothing.

The tests run in order, on one endpoint ("tiny-ssh") and two versions of a model whose predictions are
each row's sum times its scale (2 and 3)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import endpoint_client
import pytest
from airflow_helpers import load_dag, task_instance, xcom
from ssh_hosts import SSHHosts

from airflow_provider_dnntrain.launchers import SSHServing
from airflow_provider_dnntrain.operators.deploy import key_variable

SSH_DAGS = Path(__file__).resolve().parents[2] / "ssh_dags"
ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]  # sums 6 and 4
ENDPOINT = "tiny-ssh"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts", count=1) as started:
        yield started


@pytest.fixture(scope="module")
def connection(hosts):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_SSH_H0", hosts.airflow_connection(hosts.hosts[0]))
        yield


@pytest.fixture(scope="module")
def versions(tiny_versions, connection):
    yield tiny_versions
    serving = SSHServing(ssh_conn_id="ssh_h0")
    with serving.locked(ENDPOINT):  # what a failed test left
        serving.undeploy(ENDPOINT)


class Client:
    """A client on the hosts' network, calling the endpoint at the address its scoring URI names."""

    def __init__(self, hosts: SSHHosts, scoring_uri: str) -> None:
        address, port = scoring_uri.split("/")[2].split(":")
        assert address == hosts.hosts[0].address  # what the task returned: the host's own address
        self.url = f"http://127.0.0.1:{hosts.reach(hosts.hosts[0], int(port))}/invocations"

    def ask(self, key: str | None) -> tuple[int, list | None, str | None]:
        return endpoint_client.ask(self.url, ROWS, key)


@pytest.fixture(scope="module")
def client(hosts, versions):
    dag_run = deploy(versions[2.0])
    assert dag_run.state == "success"
    return Client(hosts, xcom(dag_run, "deploy")["scoring_uri"])


def deploy(version: int, dag_id: str = "dnntrain_ssh_deploy"):
    return load_dag(SSH_DAGS, dag_id).test(run_conf={"model": f"models:/tiny-served/{version}"})


def succeeded(dag_run) -> None:
    assert dag_run.state == "success"


def endpoint_key() -> str:
    from airflow.models import Variable

    return Variable.get(key_variable(ENDPOINT))


def status() -> dict:
    serving = SSHServing(ssh_conn_id="ssh_h0")
    return json.loads(serving._read_text(f"{serving.folder_path(ENDPOINT)}/status.json"))


def test_a_version_is_served_on_the_host_behind_its_key(hosts, versions, client):
    assert client.ask(endpoint_key()) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")
    for wrong in (None, "not-the-key"):
        assert client.ask(wrong)[0] == 401
    supervisor = hosts.hosts[0].job_processes()[status()["pid"]]
    assert "endpoint_supervisor.py" in supervisor  # a process of the host, not of this worker


def test_the_endpoint_outlives_the_deploy_tasks_ssh_sessions(hosts, versions, client):
    assert deploy(versions[2.0]).state == "success"  # serving it already: a no-op
    hosts.hosts[0].drop_sessions()
    assert client.ask(endpoint_key())[0] == 200


def test_a_new_version_takes_over_blue_green_while_requests_keep_coming(versions, client):
    key = endpoint_key()
    answers = endpoint_client.asked_during(lambda: client.ask(key), lambda: succeeded(deploy(versions[3.0])))
    old, new = f"tiny-served/{versions[2.0]}", f"tiny-served/{versions[3.0]}"
    endpoint_client.assert_switched_once(answers, old, new)
    assert [s["version"] for s in status()["slots"].values()] == [new]


def test_a_failed_smoke_test_leaves_the_old_version_serving(versions, client, capfd):
    dag_run = deploy(versions[2.0], "dnntrain_ssh_deploy_wrong_rows")
    assert task_instance(dag_run, "deploy").state == "failed"
    assert "smoke test: the rows do not suit the model" in "".join(capfd.readouterr())
    assert client.ask(endpoint_key())[2] == f"tiny-served/{versions[3.0]}"
    assert len(status()["slots"]) == 1


def test_a_killed_server_on_the_host_is_started_again(versions, client):
    (slot,) = status()["slots"].values()
    os.kill(slot["pid"], signal.SIGKILL)  # the hosts share this machine's PID namespace
    deadline = time.monotonic() + 60
    while client.ask(endpoint_key())[0] != 200 or next(iter(status()["slots"].values()))["starts"] < 2:
        assert time.monotonic() < deadline, "the killed server was not started again"
        time.sleep(0.5)


def test_two_deploys_of_one_endpoint_go_one_after_the_other(versions):
    endpoint_client.assert_one_holder_at_a_time(
        SSHServing(ssh_conn_id="ssh_h0"), SSHServing(ssh_conn_id="ssh_h0"), ENDPOINT
    )


def test_rolling_back_and_undeploying_leave_nothing_on_the_host(hosts, versions, client):
    assert deploy(versions[2.0]).state == "success"
    assert client.ask(endpoint_key()) == (200, [[12.0], [8.0]], f"tiny-served/{versions[2.0]}")
    serving = SSHServing(ssh_conn_id="ssh_h0")
    folder = serving.folder_path(ENDPOINT)
    assert load_dag(SSH_DAGS, "dnntrain_ssh_undeploy").test().state == "success"
    assert not Path(folder).exists()  # the host shares this machine's file system
    assert hosts.hosts[0].job_processes() == {}
    assert client.ask(endpoint_key())[0] == 0
    assert serving.undeploy(ENDPOINT) is False
