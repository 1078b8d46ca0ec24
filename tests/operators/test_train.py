"""Training operators inside real Airflow runs (dag.test() and `airflow dags test`)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pendulum
import psutil
import pytest
from airflow_helpers import (
    TEST_DAGS,
    job_processes,
    load_dag,
    rendered_fields,
    task_instance,
    wait_until_gone,
    xcom,
)
from hostile import HOSTILE_ARGUMENTS, PWNED

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.operators import (
    InvalidTrainingJob,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import ParameterServer, Resources, TorchDistributed

SCRIPTS = TEST_DAGS.parent / "scripts"
# DAGs ended from outside while every rank sleeps with a child (also run under the real scheduler).
SERVICE_DAGS = TEST_DAGS.parent / "service_dags"


@pytest.fixture(autouse=True)
def _db(airflow_db):
    return airflow_db


# -- parse time -------------------------------------------------------------------------------------


def test_invalid_topology_fails_when_the_dag_is_parsed():
    with pytest.raises(InvalidTrainingJob, match=r"task 'train'.*distribution: 'parameter_server' is not"):
        PyTorchTrainOperator(
            task_id="train", source_directory="s", entry_script="t.py", distribution=ParameterServer()
        )
    with pytest.raises(InvalidTrainingJob, match=r"distribution\.multi_worker_mirrored\.worker_count"):
        TensorFlowTrainOperator(
            task_id="train",
            source_directory="s",
            entry_script="t.py",
            distribution={"kind": "multi_worker_mirrored", "worker_count": 0},
        )
    with pytest.raises(InvalidTrainingJob, match="entry_script"):
        TensorFlowTrainOperator(task_id="train", source_directory="s", entry_script="../t.py")


def test_horovod_operator_validates_at_parse_time():
    op = PyTorchHorovodOperator(
        task_id="train",
        source_directory=str(SCRIPTS),
        entry_script="ranks.py",
        process_count_per_node=4,
        runner="mpirun",
        controller="mpi",
    )
    assert op.build_job().distribution.world_size == 4
    with pytest.raises(InvalidTrainingJob, match="task 'train'.*process_count_per_node"):
        PyTorchHorovodOperator(
            task_id="train", source_directory="s", entry_script="t.py", process_count_per_node=0
        )
    with pytest.raises(
        InvalidTrainingJob, match="node_count: the local launcher runs Horovod on this one host"
    ):
        PyTorchHorovodOperator(task_id="train", source_directory="s", entry_script="t.py", node_count=2)


def test_operator_arguments_are_keyword_only():
    with pytest.raises(TypeError):
        TensorFlowTrainOperator("train.py", "src", task_id="t")  # type: ignore[misc]


def test_dry_run_prints_the_plan(capsys):
    op = PyTorchTrainOperator(
        task_id="train",
        source_directory=str(SCRIPTS),
        entry_script="ranks.py",
        arguments=["--lr", "0.1"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=2),
    )
    plan = op.dry_run()
    printed = json.loads(capsys.readouterr().out)
    assert printed == plan
    assert [r["name"] for r in plan["replicas"]] == ["node-0", "node-1"]
    assert plan["replicas"][1]["env"]["MASTER_ADDR"] == "node-0"
    assert plan["world_size"] == 4


def test_import_needs_no_training_framework():
    code = (
        "import sys, airflow_provider_dnntrain.operators, airflow_provider_dnntrain.backends.local.launcher;"
        "print(sorted(m for m in ('tensorflow', 'torch', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- real runs --------------------------------------------------------------------------------------


def test_conf_arguments_reach_the_script_literally_and_secrets_stay_hidden(capfd):
    token = "tok-hunter2-zq9x"
    dag = load_dag(TEST_DAGS, "dnntrain_test_conf_arguments")
    conf = {
        "args": [*HOSTILE_ARGUMENTS, "--lines", "2", "--print-env", "API_TOKEN"],
        "env_value": "$(whoami)",
        "token": token,
    }
    dag_run = dag.test(run_conf=conf)
    assert dag_run.state == "success"
    result = xcom(dag_run, "train")
    assert result["status"] == "succeeded"
    run_dir = Path(result["outputs"]).parents[1]
    for name in ("worker-0", "worker-1"):
        outputs = run_dir / "replicas" / name / "outputs"
        assert json.loads((outputs / "argv.json").read_text()) == conf["args"]
        env = json.loads((outputs / "env.json").read_text())
        assert env["FROM_CONF"] == "$(whoami)"
        assert env["API_TOKEN"] == token
    assert not PWNED.exists()
    logged = capfd.readouterr()
    assert "[worker-1] worker-1 line 1" in logged.out + logged.err
    assert "[worker-1] worker-1 API_TOKEN=***" in logged.out + logged.err  # printed, and masked
    assert token not in logged.out + logged.err
    assert token not in json.dumps(rendered_fields(dag_run, "train"))
    assert token not in (run_dir / "plan.json").read_text()
    assert token not in json.dumps(result)
    assert all(token not in log.read_text() for log in run_dir.glob("logs/*.log"))
    assert (
        result["artifact_uri"]
        == tracking.client(result["tracking_uri"]).get_run(result["tracking_run_id"]).info.artifact_uri
    )


def test_templated_flags_render_and_run_id_is_pushed():
    dag = load_dag(TEST_DAGS, "dnntrain_test_templated_flags")
    dag_run = dag.test(run_conf={"name": "x; echo pwned"})
    result = xcom(dag_run, "train")
    argv = json.loads((Path(result["outputs"]) / "argv.json").read_text())
    assert argv[:2] == ["--name", "x; echo pwned"]
    assert argv[2] == "--date" and len(argv[3]) == 10
    ti = task_instance(dag_run, "train")
    assert result["run_id"].startswith("dnntrain-test-templated-flags-train-")
    assert result["run_id"].endswith(f"-t{ti.try_number}-" + result["run_id"].rsplit("-", 1)[1])
    assert result["tracking_run_id"] is None


def test_a_failing_replica_fails_the_task_and_the_tracking_run(capfd):
    dag = load_dag(TEST_DAGS, "dnntrain_test_failing_replica")
    started = time.monotonic()
    dag_run = dag.test()
    assert time.monotonic() - started < 60
    assert task_instance(dag_run, "train").state == "failed"
    logged = "".join(capfd.readouterr())
    assert "replica worker-1 failed with exit code 3" in logged
    assert "worker-1 about to fail" in logged
    client = tracking.client(tracking.resolve_tracking_uri())
    runs = client.search_runs(
        [client.get_experiment_by_name("dnntrain_test_failing_replica").experiment_id],
        filter_string="tags.`airflow.dag_id` = 'dnntrain_test_failing_replica'",
    )
    assert runs and runs[0].info.status == "FAILED"
    uploaded = [f.path for f in client.list_artifacts(runs[0].info.run_id, "outputs")]
    assert "outputs/who.txt" in uploaded


def test_registering_a_run_without_the_model_fails_clearly(capfd):
    dag = load_dag(TEST_DAGS, "dnntrain_test_register_without_model")
    dag_run = dag.test()
    assert task_instance(dag_run, "train").state == "success"
    assert task_instance(dag_run, "register").state == "failed"
    assert "has no 'outputs/model' to register" in "".join(capfd.readouterr())


def mlflow_runs(experiment: str) -> list:
    client = tracking.client(tracking.resolve_tracking_uri())
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], order_by=["start_time DESC"])


def start_dags_test(folder: Path, dag_id: str, *, output: bool = True) -> subprocess.Popen:
    """`airflow dags test` as a user runs it, in a session of its own (the test may kill it)."""
    airflow = Path(sys.executable).with_name("airflow")
    return subprocess.Popen(
        [str(airflow), "dags", "test", dag_id],
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(folder)},
        stdout=subprocess.PIPE if output else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if output else subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )


def published_pids(find_files, count: int = 2, timeout: float = 120) -> list[int]:
    """The pids in the files two replicas (or ranks) publish once they are up (written whole)."""
    deadline = time.monotonic() + timeout
    files: list[Path] = []
    while len(files) < count:
        assert time.monotonic() < deadline, "the replicas never started"
        time.sleep(0.2)
        with contextlib.suppress(ValueError):  # no run directory yet
            files = find_files()
    return [pid for f in files for pid in json.loads(f.read_text()).values()]


def test_sigterm_to_the_airflow_task_stops_every_process(tmp_path):
    """`airflow dags test` as a user runs it; SIGTERM makes Airflow call on_kill."""
    proc = start_dags_test(TEST_DAGS, "dnntrain_test_killed")
    runs = Path(os.environ["AIRFLOW_HOME"]) / "dnntrain" / "runs"
    try:
        pids = published_pids(lambda: list(runs.glob("dnntrain-test-killed-*/replicas/*/outputs/pids.json")))
        assert all(psutil.pid_exists(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
    assert job_processes("dnntrain-test-killed-") == []
    assert "Stopping every replica of run dnntrain-test-killed" in output
    run = mlflow_runs("dnntrain_test_killed")[0]
    assert run.info.status == "KILLED"
    assert run.data.tags["dnntrain.end_reason"] == "the Airflow task was stopped (on_kill)"


@pytest.mark.slow
def test_a_kill_that_arrives_while_the_job_is_submitted_is_not_lost():
    proc = start_dags_test(TEST_DAGS, "dnntrain_test_killed_while_submitting")
    runs = Path(os.environ["AIRFLOW_HOME"]) / "dnntrain" / "runs"
    try:
        deadline = time.monotonic() + 120
        while not list(runs.glob("dnntrain-test-killed-while-submitting-*.submitting")):
            assert time.monotonic() < deadline and proc.poll() is None, "never got to submit"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)  # on_kill runs now, before any replica exists
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert job_processes("dnntrain-test-killed-while-submitting-") == []
    assert "Stopping every replica" not in output  # there was no replica yet to stop
    (run,) = mlflow_runs("dnntrain_test_killed_while_submitting")[:1]
    assert run.info.status == "KILLED"


def test_invalid_topology_is_a_dag_import_error_naming_the_field(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "bad_dag.py").write_text(
        "import pendulum\n"
        "from airflow.sdk import DAG\n"
        "from airflow_provider_dnntrain.operators import TensorFlowTrainOperator\n"
        "with DAG('bad', schedule=None, start_date=pendulum.datetime(2026, 1, 1)):\n"
        "    TensorFlowTrainOperator(task_id='train', source_directory='s', entry_script='t.py',\n"
        "        distribution={'kind': 'parameter_server', 'worker_count': 0})\n"
    )
    errors = DagBag(dag_folder=str(tmp_path)).import_errors
    (message,) = errors.values()
    assert "distribution.parameter_server.worker_count: Input should be greater than or equal to 1" in message


def test_mapped_tasks_get_one_run_each():
    dag = load_dag(TEST_DAGS, "dnntrain_test_mapped_sweep")
    dag_run = dag.test()
    assert dag_run.state == "success"
    results = [xcom(dag_run, "train", map_index=i) for i in (0, 1)]
    assert len({r["run_id"] for r in results}) == 2
    argvs = [json.loads((Path(r["outputs"]) / "argv.json").read_text()) for r in results]
    assert argvs == [["--lr", "0.1"], ["--lr", "0.01"]]


# -- every end of a task leaves nothing behind -----------------------------------------------------


@pytest.mark.slow
def test_execution_timeout_stops_every_rank_and_fails_the_tracking_run():
    dag = load_dag(SERVICE_DAGS, "dnntrain_service_timeout")
    started = time.monotonic()
    dag_run = dag.test()
    assert task_instance(dag_run, "train").state == "failed"
    assert time.monotonic() - started < 15 + 30
    assert job_processes("dnntrain-service-timeout-") == []  # torchrun, both ranks, their children
    run = mlflow_runs("dnntrain_service_timeout")[0]
    assert run.info.status == "FAILED"
    assert run.data.tags["dnntrain.end_reason"].startswith("AirflowTaskTimeout")


def run_dir_of(prefix: str) -> Path:
    runs = Path(os.environ["AIRFLOW_HOME"]) / "dnntrain" / "runs"
    return max(runs.glob(f"{prefix}*"), key=lambda path: path.stat().st_mtime)


@pytest.mark.slow
@pytest.mark.parametrize("dag_id", ["dnntrain_service_torchrun", "dnntrain_service_mpirun"])
def test_sigkill_of_the_task_process_leaves_no_rank_and_no_child(dag_id):
    """The Airflow 3 supervisor SIGKILLs a task whose on_kill overran: no chance to clean up."""
    task = start_dags_test(SERVICE_DAGS, dag_id, output=False)
    prefix = dag_id.replace("_", "-") + "-train-"
    try:
        ranks_and_children = published_pids(
            lambda: list(run_dir_of(prefix).glob("replicas/*/outputs/pids-*.json"))
        )
        before = job_processes(prefix)
        assert set(ranks_and_children) <= {p.pid for p in before}  # what we will watch is all there
        os.kill(task.pid, signal.SIGKILL)
        task.wait(timeout=10)
        left = wait_until_gone(prefix, timeout=10 + 10)
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)
    assert left == [], [p.cmdline() for p in left]


# -- what the job receives -------------------------------------------------------------------------


def test_job_resources_do_not_collide_with_airflows_own():
    dag = load_dag(TEST_DAGS, "dnntrain_test_job_resources")
    resources = {task.task_id: task.build_job().resources for task in dag.tasks}
    assert resources["resources_object"] == Resources(use_gpu=True, cpu=2)
    assert resources["resources_dict"] == Resources(memory="2Gi")
    assert resources["use_gpu"] == Resources(use_gpu=True)
    assert resources["airflow_resources"] == Resources()
    assert dag.get_task("airflow_resources").resources.cpus.qty == 2  # still Airflow's, untouched
    with pytest.raises(InvalidTrainingJob, match=r"resources\.memory: String should match pattern"):
        TensorFlowTrainOperator(
            task_id="t",
            source_directory=str(SCRIPTS),
            entry_script="replica.py",
            resources={"memory": "lots"},
        )


def test_templates_inside_input_objects_are_rendered():
    dag = load_dag(TEST_DAGS, "dnntrain_test_templated_inputs")
    dag_run = dag.test(run_conf={"data": "/datasets/digits"}, logical_date=pendulum.datetime(2026, 3, 14))
    outputs = Path(xcom(dag_run, "train")["outputs"])
    assert json.loads((outputs / "argv.json").read_text()) == ["--data", "/datasets/digits/2026-03-14"]
    assert json.loads((outputs / "env.json").read_text())["DNNTRAIN_INPUT_TRAIN_DATA"] == (
        "/datasets/digits/2026-03-14"
    )


def test_metrics_logged_asynchronously_all_arrive_though_the_script_never_ends_its_run():
    dag_run = load_dag(TEST_DAGS, "dnntrain_test_metrics_every_batch").test()
    result = xcom(dag_run, "train")
    history = tracking.client(result["tracking_uri"]).get_metric_history(result["tracking_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(200))


def test_a_conf_uri_elsewhere_does_not_get_the_connections_credentials(monkeypatch, capfd):
    reader = {"conn_type": "http", "host": "data.internal", "login": "reader", "password": "s3cr3t-pw"}
    monkeypatch.setenv("AIRFLOW_CONN_WEB_READER", json.dumps(reader))
    dag = load_dag(TEST_DAGS, "dnntrain_test_conf_input_uri")
    dag_run = dag.test(run_conf={"data": "http://anyone.example/loot/"})
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "failed"
    assert (
        "inputs.train_data: connection 'web_reader' is for http(s)://data.internal; "
        "its credentials are not sent to http://anyone.example"
    ) in logged
    assert "launcher, plan:" not in logged  # refused before anything started


@pytest.mark.slow
def test_only_rank_zero_logs_to_the_run_and_every_other_rank_gets_its_own_child_run():
    dag = load_dag(TEST_DAGS, "dnntrain_test_rank_metrics")
    dag_run = dag.test()
    assert dag_run.state == "success"
    client = tracking.client(tracking.resolve_tracking_uri())
    for task_id, other in [
        ("mpirun", "launcher-0-rank1"),
        ("horovodrun", "launcher-0-rank1"),
        ("torchrun", "node-0-rank1"),
        ("multi_worker", "worker-1"),
    ]:
        result = xcom(dag_run, task_id)
        history = client.get_metric_history(result["tracking_run_id"], "loss")
        assert sorted((m.step, m.value) for m in history) == [(i, float(i)) for i in range(6)], task_id
        assert result["metrics"] == {"loss": 5.0}
        (child,) = client.search_runs(
            [client.get_run(result["tracking_run_id"]).info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{result['tracking_run_id']}'",
        )
        assert child.data.tags["dnntrain.replica"] == other
        assert child.info.run_name == f"{result['run_id']}-{other}"
        values = sorted(m.value for m in client.get_metric_history(child.info.run_id, "loss"))
        assert values == [1000.0 + i for i in range(6)], task_id
        logs = {Path(f.path).name for f in client.list_artifacts(result["tracking_run_id"], "logs/replicas")}
        assert logs == {f"{name}.log" for name in json_plan_replicas(result)}


def json_plan_replicas(result) -> list[str]:
    plan = json.loads((Path(result["outputs"]).parents[1] / "plan.json").read_text())
    return [replica["name"] for replica in plan["replicas"]]


# -- seeing the plan before running it ---------------------------------------------------------------


def test_dry_run_renders_templates_for_a_conf_and_a_date(capsys):
    dag = load_dag(TEST_DAGS, "dnntrain_test_templated_flags")
    capsys.readouterr()
    plan = dag.get_task("train").dry_run(conf={"name": "preview"}, logical_date=datetime(2026, 3, 14))
    assert plan["replicas"][0]["argv"][-4:] == ["--name", "preview", "--date", "2026-03-14"]
    assert json.loads(capsys.readouterr().out) == plan


def test_a_missing_source_directory_or_script_fails_when_the_dag_is_parsed(tmp_path):
    from airflow.dag_processing.dagbag import DagBag

    (tmp_path / "src").mkdir()
    for name, source, script in [("no_dir", "missing", "t.py"), ("no_script", "src", "t.py")]:
        (tmp_path / f"{name}.py").write_text(
            "import pendulum\n"
            "from airflow.sdk import DAG\n"
            "from airflow_provider_dnntrain.operators import TensorFlowTrainOperator\n"
            f"with DAG('{name}', schedule=None, start_date=pendulum.datetime(2026, 1, 1)):\n"
            "    TensorFlowTrainOperator(\n"
            f"        task_id='train', source_directory='{source}', entry_script='{script}')\n"
        )
    errors = {
        Path(path).stem: message for path, message in DagBag(dag_folder=str(tmp_path)).import_errors.items()
    }
    # a relative source_directory is relative to the DAG file
    assert f"source_directory: '{tmp_path / 'missing'}' is not a directory" in errors["no_dir"]
    assert f"entry_script: 't.py' is not a file in {tmp_path / 'src'}" in errors["no_script"]


def test_deferrable_needs_a_launcher_whose_replicas_outlive_the_task():
    with pytest.raises(InvalidTrainingJob, match="local launcher cannot wait on the triggerer"):
        TensorFlowTrainOperator(
            task_id="train", source_directory=str(SCRIPTS), entry_script="replica.py", deferrable=True
        )


# -- scripts written for Azure ML ---------------------------------------------------------------------


@pytest.mark.slow
def test_a_script_written_for_azure_ml_runs_unchanged_and_logs_to_the_run(capfd):
    dag_run = load_dag(TEST_DAGS, "dnntrain_test_azureml_compat").test()
    logged = "".join(capfd.readouterr())
    assert task_instance(dag_run, "train").state == "success", logged[-5000:]
    result = xcom(dag_run, "train")
    client = tracking.client(result["tracking_uri"])
    run_id = result["tracking_run_id"]
    # Only rank 0 logs (rank 1's values are 100 more): Azure's Run on the job's tracking run.
    accuracy = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "accuracy"))
    assert [step for step, _ in accuracy] == [0, 1, 2]
    assert [value for _, value in accuracy] == pytest.approx([0.5, 0.6, 0.7])
    losses = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "losses"))
    assert losses == [(0, 0.9), (1, 0.5), (2, 0.25)]
    rows = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "per_class.klass"))
    assert rows == [(0, 1.0), (1, 2.0)]
    tags = client.get_run(run_id).data.tags
    assert tags["team"] == "vision" and tags["optimizer"] == "sgd"
    assert [f.path for f in client.list_artifacts(run_id, "reports")] == ["reports/notes.txt"]
    (version,) = [v for v in client.search_model_versions("name = 'azure-style-model'") if v.run_id == run_id]
    assert version.tags["source"] == "azure" and version.source.endswith("/outputs/model.pkl")
    assert "same_class=True" in logged
    assert f"inputs [('digits', '{SCRIPTS}')]" in logged
    assert "no Workspace: azureml compat: azureml.core.Workspace is not provided" in logged
    # Azure's argument names: script_params became arguments, distributed_backend='mpi' Horovod.
    plan = json.loads((Path(result["outputs"]).parents[1] / "plan.json").read_text())
    assert plan["distribution"] == "horovod" and plan["world_size"] == 2
    assert plan["replicas"][0]["argv"][-2:] == ["--epochs", "3"]


# -- resuming ------------------------------------------------------------------------------------------


def kill_ranks_after_epoch(epoch: int, stop: threading.Event) -> dict:
    """Once the interrupted task's first try has checkpointed ``epoch``, SIGKILL its ranks (the run dies
    mid-way, as on a lost machine); what was seen, for the test."""
    import torch

    from airflow_provider_dnntrain.backends.common.folders import default_work_root

    seen = {}
    pattern = "dnntrain-test-resume-interrupted-*-t1-*/replicas/node-0"
    while not stop.is_set():
        for workdir in default_work_root().glob(pattern):
            checkpoint = workdir / "outputs" / "checkpoint.pt"
            with contextlib.suppress(Exception):  # not there yet, or being replaced
                if torch.load(checkpoint)["epoch"] >= epoch:
                    ranks = [
                        p for p in psutil.process_iter(["cwd", "cmdline"]) if p.info["cwd"] == str(workdir)
                    ]
                    ranks = [p for p in ranks if "torch_ddp_digits.py" in " ".join(p.info["cmdline"] or [])]
                    for rank in ranks:
                        rank.send_signal(signal.SIGKILL)
                    seen.update(killed=len(ranks), epoch=torch.load(checkpoint)["epoch"])
                    return seen
        time.sleep(0.02)
    return seen


@pytest.mark.slow
def test_a_run_killed_mid_way_resumes_on_retry_and_ends_as_good_as_an_uninterrupted_one(capfd):
    stop, seen = threading.Event(), {}
    killer = threading.Thread(target=lambda: seen.update(kill_ranks_after_epoch(2, stop)), daemon=True)
    killer.start()
    try:
        dag_run = load_dag(TEST_DAGS, "dnntrain_test_resume").test()
    finally:
        stop.set()
        killer.join(10)
    logged = "".join(capfd.readouterr())
    assert seen.get("killed", 0) >= 2, f"the first try was not killed mid-way: {seen}"
    retried = task_instance(dag_run, "interrupted")
    assert (retried.state, retried.try_number) == ("success", 2), logged[-5000:]
    # The retry continued from the first try's last checkpoint, shipped to it as ./resume.
    resumed_after = int(re.search(r"resuming after epoch (\d+) from resume/checkpoint.pt", logged).group(1))
    assert resumed_after >= seen["epoch"]
    facts = {
        name: json.loads((Path(xcom(dag_run, name)["outputs"]) / "summary.json").read_text())
        for name in ("interrupted", "uninterrupted")
    }
    assert facts["interrupted"]["accuracy"] == pytest.approx(facts["uninterrupted"]["accuracy"], abs=1e-6)
    assert facts["interrupted"]["weights_checksums"] == pytest.approx(
        facts["uninterrupted"]["weights_checksums"]
    )
