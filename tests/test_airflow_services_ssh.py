"""The SSH launcher under real Airflow components (scheduler with LocalExecutor, triggerer, api-server,
dag-processor) and real SSH hosts: a worker that dies mid-run is taken over by the next try; a deferred
wait ends on the triggerer, and carries on, no line logged twice, on a restarted one; a running task
marked failed or success, or timed out, is stopped. Afterwards no host holds a process of the job."""

from __future__ import annotations

import collections
import os
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from airflow_helpers import wait_for
from airflow_services import AirflowServices
from service_dags.dnntrain_service_ssh_dags import GO_AHEAD
from ssh_hosts import SSHHosts

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.run_id import make_run_id

SERVICE_DAGS = Path(__file__).resolve().parent / "service_dags"
RESUMED, DEFERRED = "dnntrain_service_ssh_resumed", "dnntrain_service_ssh_deferred"
TICKING = "dnntrain_service_ssh_ticking"
SERVING, STUBBORN = "dnntrain_service_ssh_serving", "dnntrain_service_ssh_stubborn"
TIMEOUT = "dnntrain_service_ssh_timeout"
# A rank's numbered line as the task log has it: "[node-0] [default0]:rank 0 tick 7 of 90"
TICK_LINE = re.compile(r"\[node-\d\] \[default\d\]:rank (\d) tick (\d+) of (\d+)")
REMOTE_RUNS = Path.home() / ".dnntrain" / "runs"  # the hosts share this machine's file system

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts") as started:
        yield started


@pytest.fixture(scope="module")
def services(tmp_path_factory, hosts):
    root = tmp_path_factory.mktemp("airflow-services-ssh")
    dags = root / "dags"
    dags.mkdir()
    (dags / "dnntrain_service_ssh_dags.py").symlink_to(SERVICE_DAGS / "dnntrain_service_ssh_dags.py")
    connections = {f"AIRFLOW_CONN_SSH_H{i}": hosts.airflow_connection(h) for i, h in enumerate(hosts.hosts)}
    # A dead worker's task is noticed (and retried) after 10 s without a heartbeat.
    timeouts = {
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    }
    airflow = AirflowServices(home=root / "home", dags_folder=dags, extra_env={**connections, **timeouts})
    airflow.start()
    try:
        yield airflow
    finally:
        airflow.stop()


def rank_pids(hosts: SSHHosts) -> dict[int, str]:
    """The ranks themselves (torchrun starts its workers as ``python -u script``) on every host."""
    found = {}
    for host in hosts.hosts:
        found.update({p: c for p, c in host.job_processes().items() if "-u ranks.py" in c})
    return found


def ranks_running(hosts: SSHHosts) -> bool:
    return len(rank_pids(hosts)) == 2


def try_running(services: AirflowServices, run_id: str, try_number: int) -> bool:
    task = services.task(RESUMED, run_id, "train")
    return task["try_number"] == try_number and task["state"] == "running"


def task_process(hosts: SSHHosts) -> psutil.Process | None:
    """The Airflow task process running the launcher: the one connected to a host's sshd."""
    ports = {h.port for h in hosts.hosts}
    for process in psutil.process_iter():
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(c.raddr and c.raddr.port in ports for c in connections):
            return process
    return None


def assert_hosts_clean(hosts: SSHHosts, timeout: float) -> None:
    wait_for(lambda: all(not h.job_processes() for h in hosts.hosts), timeout, "every host to be clean")


def test_a_dead_worker_is_taken_over_by_the_next_try_without_a_second_job(services, hosts):
    services.wait_for_dag(RESUMED)
    run_id = services.trigger(RESUMED)
    wait_for(lambda: ranks_running(hosts), 120, "the ranks to run")
    # Once the scripts run, the tracking run exists (they wait for its id): killing the worker while
    # it still set up a fresh MLflow store would leave the store half-migrated, a failure of its own.
    published = "dnntrain-service-ssh-resumed-*/replicas/*/outputs/pids-*.json"
    wait_for(lambda: len(list(REMOTE_RUNS.glob(published))) == 2, 120, "the scripts to run")
    ranks = rank_pids(hosts)
    worker = task_process(hosts)
    assert worker is not None
    supervisor = worker.parent()
    for process in (worker, supervisor):  # the worker dies: task process and its supervisor
        os.kill(process.pid, signal.SIGKILL)
    wait_for(lambda: try_running(services, run_id, 2), 120, "the next try to run")
    wait_for(lambda: task_process(hosts) is not None, 60, "the next try to connect")
    assert rank_pids(hosts) == ranks  # taken over: the same ranks, no second job
    # Once the next try relays the store to the hosts again, the ranks may go on (they would sleep 120 s).
    second_try = lambda: services.task_log(RESUMED, run_id, "train", try_number=2)  # noqa: E731
    wait_for(lambda: "Tracking run" in second_try(), 120, "the next try to take over")
    for workdir in REMOTE_RUNS.glob("dnntrain-service-ssh-resumed-*/replicas/*"):
        (workdir / GO_AHEAD).touch()
    state = services.wait_for_run(RESUMED, run_id, timeout=240)
    task = services.task(RESUMED, run_id, "train")
    assert state == "success" and task["try_number"] == 2, services.log("scheduler")[-3000:]
    result = services.xcom(RESUMED, run_id, "train")
    assert "-t1-" in result["run_id"]  # the first try's job, finished under the second try
    # Rank 0 logged its metrics after the takeover, through the relay the second try rebuilt.
    client = tracking.client(f"sqlite:///{services.home / 'dnntrain' / 'mlflow.db'}")
    history = client.get_metric_history(result["tracking_run_id"], "loss")
    assert sorted(m.value for m in history) == [0.0, 1.0, 2.0]
    assert_hosts_clean(hosts, timeout=30)


def test_marking_a_deferred_task_failed_stops_every_replica(services, hosts):
    services.wait_for_dag(DEFERRED)
    run_id = services.trigger(DEFERRED)
    wait_for(lambda: ranks_running(hosts), 120, "the ranks to run")
    services.wait_for_task(DEFERRED, run_id, "train", {"deferred"}, timeout=60)
    time.sleep(3)
    assert ranks_running(hosts)  # training goes on while the triggerer waits
    services.api("PATCH", f"/dags/{DEFERRED}/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"})
    assert_hosts_clean(hosts, timeout=30)


def test_a_restarted_triggerer_takes_the_wait_over_and_logs_every_line_once(services, hosts):
    services.wait_for_dag(TICKING)
    run_id = services.trigger(TICKING)
    services.wait_for_task(TICKING, run_id, "train", {"deferred"}, timeout=120)

    def ticks_logged() -> collections.Counter:
        return collections.Counter(TICK_LINE.findall(services.task_log(TICKING, run_id, "train")))

    wait_for(lambda: len(ticks_logged()) >= 20, 90, "the trigger to log some lines")
    services.restart("triggerer")
    state = services.wait_for_run(TICKING, run_id, timeout=240)
    assert state == "success", services.log("triggerer")[-3000:]
    total = 90
    expected = {(str(rank), str(tick), str(total)): 1 for rank in (0, 1) for tick in range(total)}
    counts = ticks_logged()
    assert {k: n for k, n in counts.items() if n != 1} == {}, "logged twice"
    assert set(expected) - set(counts) == set(), "never logged"
    assert_hosts_clean(hosts, timeout=30)


@pytest.mark.parametrize(
    ("dag_id", "new_state"),
    [(SERVING, "failed"), (SERVING, "success"), (STUBBORN, "failed"), (TIMEOUT, None)],
    ids=["marked-failed", "marked-success", "marked-failed-ranks-ignore-sigterm", "execution-timeout"],
)
def test_a_running_task_ended_from_outside_leaves_nothing_on_any_host(services, hosts, dag_id, new_state):
    services.wait_for_dag(dag_id)
    run_id = services.trigger(dag_id)
    wait_for(lambda: ranks_running(hosts), 120, "the ranks to run")
    if new_state is not None:
        services.api(
            "PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/train", {"new_state": new_state}
        )
    else:
        services.wait_for_task(dag_id, run_id, "train", {"failed"}, timeout=120)
    # The supervisor notices at its next heartbeat (5 s) and SIGKILLs 5 s after its SIGTERM; the
    # reapers on the hosts escalate after the launcher's grace (3 s).
    assert_hosts_clean(hosts, timeout=5 + 5 + 3 + 10)
    run = services.tracking_run(make_run_id(dag_id, "train", run_id, -1, 1))
    assert run.info.status == ("FAILED" if new_state is None else "KILLED")
