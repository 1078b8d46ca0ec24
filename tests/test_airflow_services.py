"""The local path under real Airflow components: api-server, scheduler (LocalExecutor), dag-processor
and triggerer on SQLite. Runs are triggered through the REST API and ended from outside the way users
and the Task SDK supervisor end them; after each, the machine's process table holds nothing of the job."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from airflow_helpers import EXAMPLE_DAGS, job_processes, wait_for, wait_until_gone
from airflow_services import AirflowServices

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.launchers import LocalServing
from airflow_provider_dnntrain.run_id import make_run_id

SERVICE_DAGS = Path(__file__).resolve().parent / "service_dags"
TORCHRUN, MPIRUN, TIMEOUT = "dnntrain_service_torchrun", "dnntrain_service_mpirun", "dnntrain_service_timeout"
STUBBORN = "dnntrain_service_stubborn"  # ranks ignore SIGTERM
STAGING = "dnntrain_stage_digits"  # scheduled on the Asset of the model the retraining example registers
# A stopped task: the supervisor notices at its next heartbeat (5 s), SIGTERMs, SIGKILLs 5 s later,
# and the reapers finish within the launcher's grace (10 s).
STOPPED_WITHIN = 5 + 5 + 10 + 10

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    root = tmp_path_factory.mktemp("airflow-services")
    dags = root / "dags"
    dags.mkdir()
    (dags / "dnntrain_pytorch_ddp.py").symlink_to(EXAMPLE_DAGS / "dnntrain_pytorch_ddp.py")
    (dags / "dnntrain_deploy_digits.py").symlink_to(EXAMPLE_DAGS / "dnntrain_deploy_digits.py")
    (dags / "scripts").symlink_to(EXAMPLE_DAGS / "scripts")
    (dags / "dnntrain_service_dags.py").symlink_to(SERVICE_DAGS / "dnntrain_service_dags.py")
    airflow = AirflowServices(home=root / "home", dags_folder=dags)
    airflow.start()
    try:
        yield airflow
    finally:
        airflow.stop()


def wait_for_ranks(services: AirflowServices, dag_id: str, airflow_run_id: str, try_number: int = 1) -> str:
    """The training run id once both ranks (and their children) are up."""
    job = make_run_id(dag_id, "train", airflow_run_id, -1, try_number)
    replicas = services.home / "dnntrain" / "runs" / job / "replicas"
    deadline = time.monotonic() + 120
    while len(list(replicas.glob("*/outputs/pids-*.json"))) < 2:
        assert time.monotonic() < deadline, services.log("scheduler")[-3000:]
        time.sleep(0.3)
    time.sleep(0.5)
    assert len(job_processes(job)) >= 6  # reaper, runner, 2 ranks, 2 children
    return job


def test_an_example_dag_triggered_through_the_api_trains_and_registers(services):
    run_id = services.trigger("dnntrain_pytorch_ddp", {"epochs": 2})
    assert services.wait_for_run("dnntrain_pytorch_ddp", run_id, timeout=300) == "success"
    result = services.xcom("dnntrain_pytorch_ddp", run_id, "train")
    assert result["run_id"] == make_run_id("dnntrain_pytorch_ddp", "train", run_id, -1, 1)
    assert result["status"] == "succeeded" and set(result["metrics"]) == {"loss", "accuracy"}
    version = services.xcom("dnntrain_pytorch_ddp", run_id, "register")
    client = tracking.client(result["tracking_uri"])
    registered = client.get_model_version("digits-pytorch-ddp", str(version))
    assert registered.run_id == result["tracking_run_id"]
    assert job_processes(result["run_id"]) == []


def test_retraining_deploys_through_the_api_and_emits_the_models_asset(services):
    """The gated retraining example triggered through the REST API: its endpoint's scoring URI, read
    from XCom, answers with the key (kept in an Airflow Variable) and refuses without it; the
    registration is an event of the ``model://`` Asset the staging DAG is scheduled on (unpaused, so
    that the event queues a run of it: the last test of the module runs it)."""
    services.wait_for_dag(STAGING)
    run_id = services.trigger("dnntrain_retrain_digits", {"epochs": 2})
    assert services.wait_for_run("dnntrain_retrain_digits", run_id, timeout=300) == "success"
    deployed = services.xcom("dnntrain_retrain_digits", run_id, "deploy")
    key = services.airflow("variables", "get", deployed["key_variable"]).stdout.strip()
    rows = json.dumps({"inputs": [[0.0] * 64, [0.5] * 64]}).encode()
    try:
        assert len(predictions(deployed["scoring_uri"], rows, key)) == 2
        with pytest.raises(urllib.error.HTTPError, match="401"):
            predictions(deployed["scoring_uri"], rows, None)
        events = services.api("GET", "/assets/events?limit=100")["asset_events"]
        (event,) = [e for e in events if e["uri"] == "model://digits-ddp/"]
        assert event["extra"]["version"] == deployed["model_version"]
        assert event["extra"]["model_uri"] == f"models:/digits-ddp/{deployed['model_version']}"
    finally:
        LocalServing(root=services.home / "dnntrain" / "endpoints").undeploy("digits-ddp")


def predictions(scoring_uri: str, body: bytes, key: str | None) -> list:
    request = urllib.request.Request(scoring_uri, data=body, headers={"Content-Type": "application/json"})
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.load(answer)["predictions"]


@pytest.mark.parametrize(
    ("dag_id", "new_state"), [(TORCHRUN, "failed"), (TORCHRUN, "success"), (STUBBORN, "failed")]
)
def test_marking_a_running_training_task_stops_every_process(services, dag_id, new_state):
    """With ranks that ignore SIGTERM, on_kill cannot finish before the supervisor's SIGKILL."""
    run_id = services.trigger(dag_id)
    job = wait_for_ranks(services, dag_id, run_id)
    services.api("PATCH", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/train", {"new_state": new_state})
    assert wait_until_gone(job, timeout=STOPPED_WITHIN) == []
    assert services.task(dag_id, run_id, "train")["state"] == new_state
    run = services.tracking_run(job)
    assert run.info.status == "KILLED"


def test_clearing_a_running_training_task_ends_its_try_before_the_next_one(services):
    run_id = services.trigger(TORCHRUN)
    first = wait_for_ranks(services, TORCHRUN, run_id)
    body = {"dry_run": False, "dag_run_id": run_id, "task_ids": ["train"], "only_failed": False}
    services.api("POST", f"/dags/{TORCHRUN}/clearTaskInstances", body)
    assert wait_until_gone(first, timeout=STOPPED_WITHIN) == []
    second = wait_for_ranks(services, TORCHRUN, run_id, try_number=2)  # runs again, from scratch
    assert second != first
    services.api("PATCH", f"/dags/{TORCHRUN}/dagRuns/{run_id}/taskInstances/train", {"new_state": "failed"})
    assert wait_until_gone(second, timeout=STOPPED_WITHIN) == []


@pytest.mark.parametrize("dag_id", [TORCHRUN, MPIRUN])
def test_sigkill_of_the_task_process_under_the_supervisor(services, dag_id):
    run_id = services.trigger(dag_id)
    job = wait_for_ranks(services, dag_id, run_id)
    reapers = [p for p in job_processes(job) if any(part.endswith("reaper.py") for part in p.cmdline())]
    task_process = psutil.Process(reapers[0].ppid())  # the Task SDK's task process runs the launcher
    task_process.kill()
    assert wait_until_gone(job, timeout=10 + 10) == []
    services.wait_for_task(dag_id, run_id, "train", {"failed", "up_for_retry"}, timeout=120)


def test_execution_timeout_under_the_scheduler(services):
    run_id = services.trigger(TIMEOUT)
    job = wait_for_ranks(services, TIMEOUT, run_id)
    services.wait_for_task(TIMEOUT, run_id, "train", {"failed", "up_for_retry"}, timeout=120)
    assert wait_until_gone(job, timeout=STOPPED_WITHIN) == []
    run = services.tracking_run(job)
    assert run.info.status == "FAILED"
    assert run.data.tags["dnntrain.end_reason"].startswith("AirflowTaskTimeout")


def test_last_the_scheduler_runs_the_staging_dag_on_the_version_the_retraining_registered(services):
    """Run last: until now the scheduler created no runs of its own (``use_job_schedule`` off, so that
    unpausing the weekly examples to trigger them makes no scheduled runs). Those paused, it is restarted
    with scheduling on: it runs the staging DAG for the Asset event the retraining made, and the staging
    endpoint from its XCom answers."""
    for dag in services.api("GET", "/dags?paused=false")["dags"]:
        if dag["dag_id"] != STAGING:
            services.api("PATCH", f"/dags/{dag['dag_id']}", {"is_paused": True})
    services.extra_env["AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE"] = "True"
    services.restart("scheduler")
    runs = wait_for(lambda: services.api("GET", f"/dags/{STAGING}/dagRuns")["dag_runs"], 60, "a staging run")
    (run,) = runs
    assert run["run_type"] == "asset_triggered"
    assert services.wait_for_run(STAGING, run["dag_run_id"], timeout=180) == "success"
    deployed = services.xcom(STAGING, run["dag_run_id"], "deploy_to_staging")
    registered = services.api("GET", "/assets/events?limit=100")["asset_events"]
    (event,) = [e for e in registered if e["uri"] == "model://digits-ddp/"]
    assert deployed["model_version"] == event["extra"]["version"]
    key = services.airflow("variables", "get", deployed["key_variable"]).stdout.strip()
    rows = json.dumps({"inputs": [[0.0] * 64]}).encode()
    try:
        assert len(predictions(deployed["scoring_uri"], rows, key)) == 1
    finally:
        LocalServing(root=services.home / "dnntrain" / "endpoints").undeploy("digits-ddp-staging")
