"""The example DAGs, end to end: real distributed training, XCom hand-off, real MLflow registration."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pendulum
import pytest
from airflow_helpers import EXAMPLE_DAGS, load_dag, xcom

from airflow_provider_dnntrain import tracking

EXAMPLES = {
    "dnntrain_tf_parameter_server": "digits-tf-parameter-server",
    "dnntrain_tf_multi_worker": "digits-tf-multi-worker",
    "dnntrain_pytorch_ddp": "digits-pytorch-ddp",
    "dnntrain_pytorch_horovod": "digits-pytorch-horovod",
    "dnntrain_tf_horovod": "digits-tf-horovod",
}


@pytest.fixture(autouse=True)
def _db(airflow_db):
    return airflow_db


def run_example(dag_id: str, epochs: int = 3):
    dag = load_dag(EXAMPLE_DAGS, dag_id)
    dag_run = dag.test(run_conf={"epochs": epochs})
    assert dag_run.state == "success"
    result = xcom(dag_run, "train")
    return result, xcom(dag_run, "register")


def summary(result) -> dict:
    return json.loads((Path(result["outputs"]) / "summary.json").read_text())


def replica_log(result, replica: str) -> str:
    return (Path(result["outputs"]).parents[1] / "logs" / f"{replica}.log").read_text()


def assert_registered(
    model_name: str, version: int, framework: str, model_format: str, accuracy=None
) -> None:
    """The version is a model MLflow loads (no code of ours), and it is the trained one: on the
    examples' test split it scores the accuracy the run logged."""

    client = tracking.client(tracking.resolve_tracking_uri())
    model_version = client.get_model_version(model_name, str(version))
    assert model_version.tags["framework"] == framework
    assert re.match(r"^\d+\.\d+", model_version.tags["framework_version"])
    assert model_version.tags["dataset"] == "sklearn-digits"
    assert model_version.tags["model_format"] == model_format
    assert model_version.source.endswith("/registered/model")
    model = load_registered(model_name, version)
    assert model.predict(model.input_example).shape == (5, 10)
    assert model.metadata.signature.inputs.is_tensor_spec()
    x_test, y_test = _digits_test_split()
    scored = float((model.predict(x_test).argmax(1) == y_test).mean())
    assert scored > 0.5
    if accuracy is not None:
        assert scored == pytest.approx(accuracy, abs=0.005)


def load_registered(model_name: str, version: int):
    """``models:/<name>/<version>`` loaded with mlflow.pyfunc. Not through ``mlflow.set_tracking_uri``,
    which sets MLFLOW_TRACKING_URI for every process this one starts later (the services' tasks)."""
    import mlflow

    into = Path(tempfile.mkdtemp(prefix="registered-"))
    return mlflow.pyfunc.load_model(
        tracking.download_model(tracking.resolve_tracking_uri(), model_name, version, into)
    )


def _digits_test_split():
    spec = importlib.util.spec_from_file_location("example_digits", EXAMPLE_DAGS / "scripts" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    return digits.load_digits_split()[1]


def test_example_dags_parse():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(EXAMPLE_DAGS))
    assert bag.import_errors == {}
    assert set(EXAMPLES) <= set(bag.dag_ids)
    for dag_id in EXAMPLES:
        assert {t.task_id for t in bag.get_dag(dag_id).tasks} == {"train", "register"}
    canary = bag.get_dag("dnntrain_canary_digits")  # retrain, register, gate, canary, promote
    order = ["train", "register", "canary", "watch_the_canary", "promote"]
    assert [t.task_id for t in canary.topological_sort()] == order
    assert canary.get_task("canary").canary_traffic_percent == 20
    assert canary.get_task("canary").must_beat == "champion"
    assert canary.get_task("promote").promote_alias == "champion"


@pytest.mark.slow
def test_tensorflow_parameter_server_trains_and_registers():
    result, version = run_example("dnntrain_tf_parameter_server")
    facts = summary(result)
    assert facts["workers"] == 2 and facts["parameter_servers"] == 1
    assert facts["devices"] == ["/job:ps/replica:0/task:0/device:CPU:0"]  # variables live on the ps
    assert facts["losses"][-1] < facts["losses"][0]
    assert facts["accuracy"] > 0.8
    assert "serving at" in replica_log(result, "ps-0")
    assert set(result["metrics"]) == {"loss", "accuracy"}
    assert isinstance(version, int) and version >= 1
    assert_registered("digits-tf-parameter-server", version, "tensorflow", "keras", facts["accuracy"])


@pytest.mark.slow
def test_tensorflow_multi_worker_mirrored_trains_and_registers():
    result, version = run_example("dnntrain_tf_multi_worker")
    facts = summary(result)
    assert facts["world_size"] == 2
    assert facts["allreduce_sum"] == 3.0  # (index 0 + 1) + (index 1 + 1): both workers took part
    assert facts["losses"][-1] < facts["losses"][0]
    checksums = [
        re.search(r"weights_checksum=(\S+)", replica_log(result, f"worker-{i}")).group(1) for i in (0, 1)
    ]
    assert checksums[0] == checksums[1]  # all-reduced gradients keep the replicas identical
    assert result["metrics"]["accuracy"] == pytest.approx(facts["accuracy"])
    assert_registered("digits-tf-multi-worker", version, "tensorflow", "keras", facts["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("dag_id", "framework", "model_format"),
    [("dnntrain_pytorch_horovod", "pytorch", "torchscript"), ("dnntrain_tf_horovod", "tensorflow", "keras")],
)
def test_horovod_examples_train_and_register(dag_id, framework, model_format):
    result, version = run_example(dag_id, epochs=2)
    facts = summary(result)
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    assert facts["weights_checksums"][0] == pytest.approx(facts["weights_checksums"][1], abs=1e-5)
    assert set(result["metrics"]) == {"loss", "accuracy"}
    assert_registered(EXAMPLES[dag_id], version, framework, model_format, result["metrics"]["accuracy"])


@pytest.mark.slow
def test_pytorch_ddp_backfill_date_reaches_the_job_and_the_registry():
    dag = load_dag(EXAMPLE_DAGS, "dnntrain_pytorch_ddp")
    dag_run = dag.test(logical_date=pendulum.datetime(2026, 3, 14, tz="UTC"), run_conf={"epochs": 2})
    assert dag_run.state == "success"
    result, version = xcom(dag_run, "train"), xcom(dag_run, "register")
    plan = json.loads((Path(result["outputs"]).parents[1] / "plan.json").read_text())
    assert plan["replicas"][0]["env"]["TRAINING_DATE"] == "2026-03-14"
    assert summary(result)["world_size"] == 2
    client = tracking.client(result["tracking_uri"])
    assert client.get_model_version("digits-pytorch-ddp", str(version)).tags["training_date"] == "2026-03-14"
    assert client.get_run(result["tracking_run_id"]).data.tags["dnntrain.run_id"] == result["run_id"]


@pytest.mark.slow
def test_pytorch_ddp_through_airflow_dags_test_like_a_user(tmp_path):
    airflow = Path(sys.executable).with_name("airflow")
    before = _latest_version("digits-pytorch-ddp")
    completed = subprocess.run(
        [str(airflow), "dags", "test", "dnntrain_pytorch_ddp", "-c", json.dumps({"epochs": 3})],
        env={**os.environ, "AIRFLOW__CORE__DAGS_FOLDER": str(EXAMPLE_DAGS)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-5000:]
    assert "[node-0] [default0]:rank=0 world_size=2" in output
    assert "[node-0] [default1]:rank=1 world_size=2" in output
    version = _latest_version("digits-pytorch-ddp")
    assert version == before + 1
    assert f"Registered model digits-pytorch-ddp version {version}" in output
    dag_run = _latest_dag_run("dnntrain_pytorch_ddp")
    assert xcom(dag_run, "register") == version
    assert xcom(dag_run, "train")["status"] == "succeeded"
    client = tracking.client(tracking.resolve_tracking_uri())
    run = client.get_run(client.get_model_version("digits-pytorch-ddp", str(version)).run_id)
    facts = json.loads(Path(client.download_artifacts(run.info.run_id, "outputs/summary.json")).read_text())
    assert facts["world_size"] == 2 and facts["allreduce_sum"] == 3.0
    assert facts["weights_checksums"][0] == facts["weights_checksums"][1]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 3 and history[-1].value < history[0].value
    assert run.data.tags["airflow.dag_id"] == "dnntrain_pytorch_ddp"
    assert run.data.params["world_size"] == "2"
    assert_registered("digits-pytorch-ddp", version, "pytorch", "torchscript")
    assert_downloadable_like_the_readme_says("digits-pytorch-ddp", version, "MLmodel", tmp_path)


def assert_downloadable_like_the_readme_says(model_name, version, expected_file, destination) -> None:
    """A registered version's files come back later through the registry URI (MLflow's own CLI)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    completed = subprocess.run(
        [
            str(mlflow),
            "artifacts",
            "download",
            "-u",
            f"models:/{model_name}/{version}",
            "-d",
            str(destination),
        ],
        env={**os.environ, "MLFLOW_TRACKING_URI": tracking.resolve_tracking_uri()},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert (destination / expected_file).stat().st_size > 0


def _latest_version(name: str) -> int:
    client = tracking.client(tracking.resolve_tracking_uri())
    return max((int(v.version) for v in client.search_model_versions(f"name = '{name}'")), default=0)


def _latest_dag_run(dag_id: str):
    from airflow.models.dagrun import DagRun
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        return session.scalars(
            select(DagRun).where(DagRun.dag_id == dag_id).order_by(DagRun.id.desc()).limit(1)
        ).one()


@pytest.mark.slow
def test_retraining_deploys_a_better_version_and_skips_a_worse_one(capfd):
    """The quality gate of ``dnntrain_retrain_digits``: the first version has no champion to beat and is
    served; one trained for a single epoch scores lower and is not deployed, saying why."""
    from airflow_provider_dnntrain.launchers import LocalServing

    dag = load_dag(EXAMPLE_DAGS, "dnntrain_retrain_digits")
    try:
        first = dag.test(run_conf={"epochs": 3})
        assert first.state == "success"
        deployed = xcom(first, "deploy")
        assert deployed["model_version"] == xcom(first, "register") and deployed["state"] == "serving"
        second = dag.test(run_conf={"epochs": 1})
        assert [ti.state for ti in second.get_task_instances() if ti.task_id == "deploy"] == ["skipped"]
        assert "not better than champion" in "".join(capfd.readouterr())
        serving = LocalServing().current("digits-ddp")
        assert serving.serving == f"digits-ddp/{deployed['model_version']}"  # the champion still serves
    finally:
        LocalServing().undeploy("digits-ddp")


@pytest.fixture(scope="module")
def ssh_host(tmp_path_factory):
    from ssh_hosts import SSHHosts

    with (
        SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts", count=1) as hosts,
        pytest.MonkeyPatch.context() as patch,
    ):
        patch.setenv("AIRFLOW_CONN_SSH_EXAMPLES", hosts.airflow_connection(hosts.hosts[0]))
        yield hosts


@pytest.mark.slow
def test_every_example_model_is_served_locally_and_on_an_ssh_host_answering_as_it_loads(ssh_host, tmp_path):
    """Each example's latest version (registered by the tests above), rolled out in turn on one endpoint
    per backend - blue/green, smoke-tested with its input example - answers the digits test split
    through the endpoint, with the key, exactly as ``mlflow.pyfunc`` predicts in this process."""
    import mlflow
    import numpy as np
    from endpoint_client import ask

    from airflow_provider_dnntrain.backends.serving import ServedVersion, roll_out
    from airflow_provider_dnntrain.launchers import LocalServing, SSHServing
    from airflow_provider_dnntrain.operators import smoke

    x_test = _digits_test_split()[0][:64].tolist()
    key, uri = "example-endpoints-key", tracking.resolve_tracking_uri()
    backends = {"local": LocalServing(), "ssh": SSHServing(ssh_conn_id="ssh_examples")}
    try:
        for model_name in EXAMPLES.values():
            version = _latest_version(model_name)
            assert version, f"{model_name} was not registered by the tests above"
            model_dir = Path(tracking.download_model(uri, model_name, version, tmp_path / model_name))
            served = ServedVersion(model_name, str(version), model_dir)
            expected = np.asarray(
                mlflow.pyfunc.load_model(str(model_dir)).predict(np.asarray(x_test, "float32"))
            )
            for where, serving in backends.items():
                with serving.locked("examples"):
                    state = roll_out(
                        serving, "examples", served, smoke.key_hash(key), smoke.check(model_dir, key, None)
                    )
                scoring_uri = state.scoring_uri
                if where == "ssh":  # called on the hosts' network, at the address the endpoint names
                    port = int(urlsplit(scoring_uri).port)
                    scoring_uri = f"http://127.0.0.1:{ssh_host.reach(ssh_host.hosts[0], port)}/invocations"
                status, predictions, answered_by = ask(scoring_uri, x_test, key)
                assert (status, answered_by) == (200, served.label), where
                assert np.allclose(predictions, expected, atol=1e-5), (where, model_name)
                assert ask(scoring_uri, x_test, None)[0] == 401
    finally:
        for serving in backends.values():
            with serving.locked("examples"):
                serving.undeploy("examples")
