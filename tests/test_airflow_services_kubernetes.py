"""The Kubernetes launcher under real Airflow components (scheduler with LocalExecutor, triggerer,
api-server, dag-processor) and the fake cluster: a worker that dies mid-run is taken over by the next
try; a deferred wait ends on the triggerer, and carries on, no line logged twice, on a restarted one; a
running task marked failed or success, or timed out, is stopped. Afterwards the cluster holds nothing of
the run: no pod, Service, Secret or ConfigMap, and no process in any pod."""

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
from fake_kubernetes import FakeCluster
from service_dags.dnntrain_service_kubernetes_dags import GO_AHEAD

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.run_id import make_run_id

SERVICE_DAGS = Path(__file__).resolve().parent / "service_dags"
RESUMED, DEFERRED = "dnntrain_service_k8s_resumed", "dnntrain_service_k8s_deferred"
TICKING = "dnntrain_service_k8s_ticking"
SERVING, STUBBORN = "dnntrain_service_k8s_serving", "dnntrain_service_k8s_stubborn"
TIMEOUT = "dnntrain_service_k8s_timeout"
# A rank's numbered line as the task log has it: "[node-0] [default0]:rank 0 tick 7 of 90"
TICK_LINE = re.compile(r"\[node-\d\] \[default\d\]:rank (\d) tick (\d+) of (\d+)")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with FakeCluster(tmp_path_factory.mktemp("kubernetes") / "cluster") as started:
        yield started


@pytest.fixture(scope="module")
def services(tmp_path_factory, cluster):
    root = tmp_path_factory.mktemp("airflow-services-kubernetes")
    dags = root / "dags"
    dags.mkdir()
    name = "dnntrain_service_kubernetes_dags.py"
    (dags / name).symlink_to(SERVICE_DAGS / name)
    # A dead worker's task is noticed (and retried) after 10 s without a heartbeat.
    settings = {
        "AIRFLOW_CONN_KUBERNETES_FAKE": cluster.airflow_connection(),
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "10",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "2",
    }
    airflow = AirflowServices(home=root / "home", dags_folder=dags, extra_env=settings)
    airflow.start()
    try:
        yield airflow
    finally:
        airflow.stop()


def rank_pids(cluster: FakeCluster) -> dict[int, str]:
    """The ranks themselves (torchrun starts its workers as ``python -u script``) in every pod."""
    return {pid: command for pid, command in cluster.pod_commands().items() if "-u ranks.py" in command}


def ranks_running(cluster: FakeCluster) -> bool:
    return len(rank_pids(cluster)) == 2


def task_process(cluster: FakeCluster) -> psutil.Process | None:
    """The Airflow task process running the launcher: the one holding log streams to the API server."""
    for process in psutil.process_iter():
        try:
            connections = process.net_connections(kind="tcp")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if process.pid != cluster.process.pid and any(
            c.raddr and c.raddr.port == cluster.port for c in connections
        ):
            return process
    return None


def scripts_published(cluster: FakeCluster, pod_prefix: str) -> int:
    """How many ranks have published their pids (ranks.py --spawn): their scripts run."""
    return sum(bool(list(d.glob("outputs/pids*"))) for d in cluster.workdirs(pod_prefix))


def assert_cluster_clean(cluster: FakeCluster, timeout: float) -> None:
    kinds = ("pods", "services", "secrets", "configmaps")

    def clean() -> bool:
        return not any(cluster.objects(kind) for kind in kinds) and not cluster.pod_processes()

    wait_for(clean, timeout, "the cluster to hold nothing of the run")


def test_a_dead_worker_is_taken_over_by_the_next_try_without_a_second_job(services, cluster):
    services.wait_for_dag(RESUMED)
    run_id = services.trigger(RESUMED)
    wait_for(lambda: ranks_running(cluster), 120, "the ranks to run")
    # Once the scripts run, the tracking run exists (their pods were created with its id).
    wait_for(
        lambda: scripts_published(cluster, "dnntrain-service-k8s-resumed") == 2, 120, "the scripts to run"
    )
    pods_created = cluster.requests()["POST pods"]
    worker = wait_for(lambda: task_process(cluster), 30, "the task process")
    supervisor = worker.parent()
    for process in (worker, supervisor):  # the worker dies: task process and its supervisor
        os.kill(process.pid, signal.SIGKILL)
    wait_for(lambda: services.task(RESUMED, run_id, "train")["try_number"] == 2, 120, "the next try")
    # Once the next try serves the store to the pods again, the ranks may go on (they would sleep 120 s).
    second_try = lambda: services.task_log(RESUMED, run_id, "train", try_number=2)  # noqa: E731
    wait_for(lambda: "Tracking run" in second_try(), 120, "the next try to take over")
    for workdir in cluster.workdirs("dnntrain-service-k8s-resumed"):
        (workdir / GO_AHEAD).touch()
    state = services.wait_for_run(RESUMED, run_id, timeout=240)
    task = services.task(RESUMED, run_id, "train")
    assert state == "success" and task["try_number"] == 2, services.log("scheduler")[-3000:]
    result = services.xcom(RESUMED, run_id, "train")
    assert "-t1-" in result["run_id"]  # the first try's run, finished under the second try
    log = services.task_log(RESUMED, run_id, "train", try_number=2)
    assert "took over the replicas an earlier try started" in log
    assert cluster.requests()["POST pods"] == pods_created  # the same pods carried on: no second job
    # Rank 0 logged its metrics after the takeover, through the store the second try served again.
    client = tracking.client(f"sqlite:///{services.home / 'dnntrain' / 'mlflow.db'}")
    history = client.get_metric_history(result["tracking_run_id"], "loss")
    assert sorted(m.value for m in history) == [0.0, 1.0, 2.0]
    assert_cluster_clean(cluster, timeout=30)


def test_marking_a_deferred_task_failed_deletes_the_run(services, cluster):
    services.wait_for_dag(DEFERRED)
    run_id = services.trigger(DEFERRED)
    wait_for(lambda: ranks_running(cluster), 120, "the ranks to run")
    services.wait_for_task(DEFERRED, run_id, "train", {"deferred"}, timeout=60)
    time.sleep(3)
    assert ranks_running(cluster)  # training goes on while the triggerer waits
    services.api("PATCH", f"/dags/{DEFERRED}/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"})
    assert_cluster_clean(cluster, timeout=30)


def test_a_restarted_triggerer_takes_the_wait_over_and_logs_every_line_once(services, cluster):
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
    assert_cluster_clean(cluster, timeout=30)


@pytest.mark.parametrize(
    ("dag_id", "new_state"),
    [(SERVING, "failed"), (SERVING, "success"), (STUBBORN, "failed"), (TIMEOUT, None)],
    ids=["marked-failed", "marked-success", "marked-failed-ranks-ignore-sigterm", "execution-timeout"],
)
def test_a_running_task_ended_from_outside_leaves_nothing_in_the_cluster(
    services, cluster, dag_id, new_state
):
    services.wait_for_dag(dag_id)
    run_id = services.trigger(dag_id)
    wait_for(lambda: ranks_running(cluster), 120, "the ranks to run")
    if new_state is not None:
        services.api(
            "PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/train", {"new_state": new_state}
        )
    else:
        services.wait_for_task(dag_id, run_id, "train", {"failed"}, timeout=120)
    # The supervisor notices at its next heartbeat (5 s) and SIGKILLs 5 s after its SIGTERM; the
    # cluster gives the pods their grace (3 s) after the owner's deletion.
    assert_cluster_clean(cluster, timeout=5 + 5 + 3 + 10)
    run = services.tracking_run(make_run_id(dag_id, "train", run_id, -1, 1))
    assert run.info.status == ("FAILED" if new_state is None else "KILLED")
