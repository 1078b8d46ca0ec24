"""Training operators inside real Airflow runs (dag.test() and `airflow dags test`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from airflow_helpers import TEST_DAGS, load_dag, rendered_fields, task_instance, xcom

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.operators import (
    InvalidTrainingJob,
    PyTorchHorovodOperator,
    PyTorchTrainOperator,
    TensorFlowTrainOperator,
)
from airflow_provider_dnntrain.spec import ParameterServer, TorchDistributed

HOSTILE = ["; rm -rf /tmp/dnntrain-victim", "$(touch /tmp/dnntrain-pwned)", "`id`", "a\nb", "'q' \"dq\" \\"]


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
        source_directory="s",
        entry_script="t.py",
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
        source_directory="src",
        entry_script="train.py",
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
        "import sys, airflow_provider_dnntrain.operators, airflow_provider_dnntrain.launchers.local;"
        "print(sorted(m for m in ('tensorflow', 'torch', 'mlflow') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# -- real runs --------------------------------------------------------------------------------------


def test_conf_arguments_reach_the_script_literally_and_secrets_stay_hidden(capfd):
    token = "tok-hunter2-zq9x"
    dag = load_dag(TEST_DAGS, "dnntrain_test_conf_arguments")
    conf = {"args": [*HOSTILE, "--lines", "2"], "env_value": "$(whoami)", "token": token}
    dag_run = dag.test(run_conf=conf)
    assert dag_run.state == "success"
    result = xcom(dag_run, "train")
    assert result["status"] == "succeeded"
    run_dir = Path(result["outputs"]).parents[1]
    for name in ("worker-0", "worker-1"):
        outputs = run_dir / "replicas" / name / "outputs"
        assert json.loads((outputs / "argv.json").read_text()) == [*HOSTILE, "--lines", "2"]
        env = json.loads((outputs / "env.json").read_text())
        assert env["FROM_CONF"] == "$(whoami)"
        assert env["API_TOKEN"] == token
    assert not Path("/tmp/dnntrain-pwned").exists()
    logged = capfd.readouterr()
    assert "[worker-1] worker-1 line 1" in logged.out + logged.err
    assert token not in logged.out + logged.err
    assert token not in json.dumps(rendered_fields(dag_run, "train"))
    assert token not in (run_dir / "plan.json").read_text()


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


def test_sigterm_to_the_airflow_task_stops_every_process(tmp_path):
    """`airflow dags test` as a user runs it; SIGTERM makes Airflow call on_kill."""
    env = {**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(TEST_DAGS)}
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.Popen(
        [str(airflow), "dags", "test", "dnntrain_test_killed"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pid_files: list[Path] = []
    try:
        deadline = time.monotonic() + 120
        runs = Path(os.environ["AIRFLOW_HOME"]) / "dnntrain" / "runs"
        while time.monotonic() < deadline and len(pid_files) < 2:
            pid_files = list(runs.glob("dnntrain-test-killed-*/replicas/*/outputs/pids.json"))
            time.sleep(0.2)
        assert len(pid_files) == 2, "replicas never started"
        time.sleep(0.5)
        pids = [pid for f in pid_files for pid in json.loads(f.read_text()).values()]
        assert all(psutil.pid_exists(pid) for pid in pids)
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    alive = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert alive == []
    assert "Stopping every replica of run dnntrain-test-killed" in output


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
