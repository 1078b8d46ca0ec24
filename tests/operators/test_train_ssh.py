"""Training operators on the SSH launcher inside real Airflow runs: dag.test() against real sshd hosts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from airflow_helpers import EXAMPLE_DAGS, load_dag, task_instance, wait_for, xcom
from hostile import HOSTILE_ARGUMENTS, PWNED
from ssh_hosts import SSHHosts

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.launchers import SSHLauncher
from airflow_provider_dnntrain.operators import PyTorchTrainOperator
from airflow_provider_dnntrain.spec import TorchDistributed

SSH_DAGS = Path(__file__).resolve().parents[1] / "ssh_dags"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts") as started:
        yield started


@pytest.fixture(autouse=True)
def connections(airflow_db, hosts, monkeypatch):
    for index, host in enumerate(hosts.hosts):
        monkeypatch.setenv(f"AIRFLOW_CONN_SSH_H{index}", hosts.airflow_connection(host))


def assert_nothing_left(hosts: SSHHosts) -> None:
    for host in hosts.hosts:
        assert host.job_processes() == {}, host.name


@pytest.mark.slow
def test_parameter_server_across_three_hosts_trains_logs_metrics_and_registers(hosts, capfd):
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_parameter_server").test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-5000:]
    result = xcom(dag_run, "train")
    placed = {line.split()[0] for line in logged.splitlines() if '"host": "10.213.0.' in line}
    assert placed, "the plan in the log shows where each replica ran"
    addresses = {h.address for h in hosts.hosts}
    plan_hosts = [r for r in addresses if f'"host": "{r}"' in logged]
    assert sorted(plan_hosts) == sorted(addresses)  # chief, ps and worker each on a host of its own
    # Rank 0 (the chief) logged its metrics from a remote host into the embedded store.
    assert set(result["metrics"]) >= {"loss", "accuracy"}, result
    client = tracking.client(result["tracking_uri"])
    history = client.get_metric_history(result["tracking_run_id"], "loss")
    assert len(history) == 2
    assert (Path(result["outputs"]) / "model").is_dir()
    assert_nothing_left(hosts)


def running_scripts(host) -> list[str]:
    return [cmd for cmd in host.job_processes().values() if "replica.py" in cmd]


def replicas_ready(dag_id: str, count: int) -> bool:
    """Whether ``count`` replicas of the DAG's run have said "ready" (their scripts run, submit is over)."""
    runs = Path.home() / ".dnntrain" / "runs"  # the hosts share this machine's file system
    ready = 0
    for log in runs.glob(f"{dag_id.replace('_', '-')}-train-*/hosts/*/logs/worker-*.log"):
        with contextlib.suppress(OSError):
            ready += " ready" in log.read_text(errors="replace")
    return ready == count


def assert_nothing_left_within(hosts: SSHHosts, timeout: float) -> None:
    """Every host's processes end: at once where the launcher could reach the host, and within the
    orphan timeout (15 s in these DAGs) where it could not."""
    wait_for(lambda: all(not h.job_processes() for h in hosts.hosts), timeout, "every host to be clean")


def test_a_failing_replica_fails_the_task_naming_it_and_stops_the_others(hosts, capfd):
    started = time.monotonic()
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_failing_replica").test()
    assert time.monotonic() - started < 60
    assert task_instance(dag_run, "train").state == "failed"
    assert "replica worker-2 failed with exit code 3" in "".join(capfd.readouterr())
    assert_nothing_left(hosts)


def test_hostile_arguments_arrive_literally_on_every_host_and_secrets_stay_hidden(hosts, capfd):
    token = "tok-hunter2-ssh-7kq"
    conf = {
        "args": [*HOSTILE_ARGUMENTS, "--print-env", "API_TOKEN"],
        "env_value": "$(whoami)",
        "token": token,
    }
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_conf_arguments").test(run_conf=conf)
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-3000:]
    result = xcom(dag_run, "train")
    remote_job = Path.home() / ".dnntrain" / "runs" / result["run_id"]  # kept: keep_remote_files=True
    for name in ("worker-0", "worker-1", "worker-2"):
        outputs = remote_job / "replicas" / name / "outputs"
        assert json.loads((outputs / "argv.json").read_text()) == conf["args"]
        env = json.loads((outputs / "env.json").read_text())
        assert env["FROM_CONF"] == "$(whoami)" and env["API_TOKEN"] == token
        assert "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN" not in env  # the worker's settings stay there
        assert f"[{name}] {name} API_TOKEN=***" in logged
    assert not PWNED.exists()
    assert token not in logged
    run_dir = Path(result["outputs"]).parents[1]
    for path in [run_dir / "plan.json", *run_dir.rglob("*.log")]:
        assert token not in path.read_text(), path
    launcher_made = [remote_job, *remote_job.glob("*"), *remote_job.glob("hosts/*/*")]
    launcher_made += [*remote_job.rglob("pending-env.json"), *remote_job.glob("replicas/*")]
    for path in launcher_made:  # what the launcher writes on a host is its owner's only
        assert path.stat().st_mode & 0o077 == 0, path
    for path in remote_job.rglob("host.json"):
        assert token not in path.read_text()
    shutil.rmtree(remote_job)


def test_an_unknown_host_key_is_refused_clearly(hosts, monkeypatch, capfd):
    host = hosts.hosts[0]
    monkeypatch.setenv("AIRFLOW_CONN_SSH_UNPINNED", hosts.airflow_connection(host, host_key=None))
    started = time.monotonic()
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_unknown_host_key").test()
    assert time.monotonic() - started < 30  # refused at once, not retried
    assert task_instance(dag_run, "train").state == "failed"
    logged = "".join(capfd.readouterr())
    assert "unknown host key" in logged and "ssh_unpinned" in logged
    assert not host.job_processes()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("cut", "dag_id"),
    [
        ("sshd killed", "dnntrain_ssh_serving"),
        ("link down", "dnntrain_ssh_serving"),
        ("link down", "dnntrain_ssh_serving_deferred"),  # noticed by the trigger
    ],
)
def test_a_host_lost_mid_run_fails_the_job_naming_it_and_nothing_is_left(
    tmp_path, monkeypatch, capfd, cut, dag_id
):
    with SSHHosts(tmp_path / "hosts") as own:  # this test breaks a host: a set of its own
        for index, host in enumerate(own.hosts):
            monkeypatch.setenv(f"AIRFLOW_CONN_SSH_H{index}", own.airflow_connection(host))
        lost = own.hosts[1]
        cut_at = []

        def cut_off() -> None:
            try:
                # Once each says it is ready, submit is over: a host lost while submitting fails the
                # job at once (naming it too), which is not what this test is about.
                wait_for(lambda: replicas_ready(dag_id, 3), 120, "every replica to run")
                if cut == "sshd killed":
                    for pid in lost.sshd_pids():
                        os.kill(pid, signal.SIGKILL)
                else:
                    own.cut_off(lost)
                cut_at.append(time.monotonic())
            except BaseException as error:
                cut_at.append(error)

        cutter = threading.Thread(target=cut_off, daemon=True)
        cutter.start()
        dag_run = load_dag(SSH_DAGS, dag_id).test()
        ended = time.monotonic()
        cutter.join(timeout=5)
        logged = "".join(capfd.readouterr())
        assert task_instance(dag_run, "train").state == "failed"
        assert cut_at and isinstance(cut_at[0], float), cut_at
        assert ended - cut_at[0] < 45, "failed within 30 s, then stopped the rest"
        assert f"host {lost.address}" in logged and "has not answered" in logged
        assert_nothing_left_within(own, timeout=30)


@pytest.mark.slow
def test_connections_dropped_mid_run_are_made_again_and_rank_zero_still_reaches_the_store(hosts, capfd):
    rank_zero_host = hosts.hosts[0]  # static rendezvous: node 0 holds rank 0
    dropped = []

    def drop() -> None:
        try:
            published = Path.home() / ".dnntrain" / "runs"
            pattern = "dnntrain-ssh-late-metrics-*/replicas/*/outputs/pids-*.json"
            wait_for(lambda: len(list(published.glob(pattern))) == 2, 120, "the scripts to run")
            dropped.extend(rank_zero_host.drop_sessions())
        except BaseException as error:
            dropped.append(error)

    dropper = threading.Thread(target=drop, daemon=True)
    dropper.start()
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_late_metrics").test()
    dropper.join(timeout=5)
    logged = "".join(capfd.readouterr())
    assert dropped and all(isinstance(pid, int) for pid in dropped), dropped
    assert task_instance(dag_run, "train").state == "success", logged[-3000:]
    result = xcom(dag_run, "train")
    history = tracking.client(result["tracking_uri"]).get_metric_history(result["tracking_run_id"], "loss")
    assert sorted(m.value for m in history) == [0.0, 1.0, 2.0]  # rank 0's, through the forward made again
    assert_nothing_left(hosts)


@pytest.mark.slow
def test_a_deferred_wait_streams_every_line_once_and_finishes_the_run(hosts, capfd):
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_deferrable").test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-3000:]
    assert "waiting on the triggerer" in logged
    for node, rank in (("node-0", 0), ("node-1", 1)):  # from the trigger, once each
        assert logged.count(f"[{node}] [default0]:rank={rank} world_size=2") == 1
        assert logged.count(f"[{node}] [default0]:epoch=1 loss=") == 1
    result = xcom(dag_run, "train")
    assert json.loads((Path(result["outputs"]) / "summary.json").read_text())["allreduce_sum"] == 3.0
    assert_nothing_left(hosts)


def test_deferring_with_the_embedded_store_is_refused_clearly(hosts, capfd):
    dag_run = load_dag(SSH_DAGS, "dnntrain_ssh_deferrable_embedded_store").test()
    assert task_instance(dag_run, "train").state == "failed"
    assert "give the hosts a tracking server they reach themselves" in "".join(capfd.readouterr())
    assert_nothing_left(hosts)


@pytest.mark.slow
def test_the_example_dag_trains_on_hosts_listed_in_one_connection(hosts, monkeypatch, capfd):
    monkeypatch.setenv("AIRFLOW_CONN_DNNTRAIN_SSH_HOSTS", hosts.host_list_connection())
    dag_run = load_dag(EXAMPLE_DAGS, "dnntrain_ssh_pytorch_ddp").test(run_conf={"epochs": 2})
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "register").state == "success", logged[-3000:]
    result = xcom(dag_run, "train")
    assert set(result["metrics"]) == {"loss", "accuracy"}  # rank 0 logged them from its host
    assert f'"host": "{hosts.hosts[0].address}"' in logged and f'"host": "{hosts.hosts[1].address}"' in logged
    assert_nothing_left(hosts)


def test_dry_run_shows_the_real_hosts(hosts, capsys):
    op = PyTorchTrainOperator(
        task_id="train",
        source_directory=str(EXAMPLE_DAGS / "scripts"),
        entry_script="torch_ddp_digits.py",
        distribution=TorchDistributed(node_count=3, process_count_per_node=2),
        launcher=SSHLauncher(ssh_conn_ids=["ssh_h0", "ssh_h1", "ssh_h2"]),
    )
    plan = op.dry_run()
    assert json.loads(capsys.readouterr().out) == plan
    assert [r["host"] for r in plan["replicas"]] == [h.address for h in hosts.hosts]
    assert {r["env"]["MASTER_ADDR"] for r in plan["replicas"]} == {hosts.hosts[0].address}
    too_many = op.distribution.model_copy(update={"node_count": 4})
    with pytest.raises(ValueError, match="distribution.node_count: 4 nodes, but the SSH launcher has 3"):
        PyTorchTrainOperator(
            task_id="train4",
            source_directory=str(EXAMPLE_DAGS / "scripts"),
            entry_script="torch_ddp_digits.py",
            distribution=too_many,
            launcher=SSHLauncher(ssh_conn_ids=["ssh_h0", "ssh_h1", "ssh_h2"]),
        ).dry_run()


@pytest.mark.slow
def test_sigterm_to_the_airflow_task_stops_the_replicas_on_every_host(hosts):
    """`airflow dags test` as a user runs it; SIGTERM makes Airflow call on_kill."""
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.Popen(
        [str(airflow), "dags", "test", "dnntrain_ssh_serving"],
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(SSH_DAGS)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        wait_for(lambda: all(running_scripts(h) for h in hosts.hosts), 120, "every replica to run")
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # on_kill stops the replicas, or, when it came while they were being started, submit's end does.
    assert "Stopping every replica of run dnntrain-ssh-serving" in output or (
        "The task was stopped while run dnntrain-ssh-serving" in output
    )
    # cancel() only asks (it runs in Airflow's signal handler); the reapers finish within their grace.
    assert_nothing_left_within(hosts, timeout=15)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dag_id",
    [
        "dnntrain_ssh_torch_c10d",
        "dnntrain_ssh_horovod_mpirun",
        "dnntrain_ssh_horovod_gloo",
        "dnntrain_ssh_multi_worker",
    ],
)
def test_ranks_on_two_hosts_train_and_rank_zero_logs_the_metrics(hosts, capfd, dag_id):
    dag_run = load_dag(SSH_DAGS, dag_id).test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-3000:]
    result = xcom(dag_run, "train")
    assert set(result["metrics"]) == {"loss", "accuracy"}
    history = tracking.client(result["tracking_uri"]).get_metric_history(result["tracking_run_id"], "loss")
    assert len(history) == 2  # rank 0's, from its host, through the relay
    summary = json.loads((Path(result["outputs"]) / "summary.json").read_text())
    assert summary["allreduce_sum"] == 3.0
    if "_horovod_" in dag_id:  # each rank on its own host, all-reducing with the other
        for rank, host in enumerate(hosts.hosts[:2]):
            said = re.search(rf"rank={rank} size=2 .* allreduce_sum=3.0 host=(\S+)", logged)
            assert said and said.group(1) == host.name, logged[-3000:]
    if dag_id.endswith("multi_worker"):
        for index, host in enumerate(hosts.hosts[:2]):
            assert f"[worker-{index}] task=worker:{index} world_size=2 allreduce_sum=3.0" in logged
            assert f'"host": "{host.address}"' in logged
    assert_nothing_left(hosts)
