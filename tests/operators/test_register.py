"""RegisterModelOperator in real Airflow runs: a version that loads with mlflow.pyfunc, Azure ML's
names kept on it, and an Asset event per registration."""

from __future__ import annotations

import json

import pytest
from airflow_helpers import TEST_DAGS, load_dag, task_instance, xcom

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.operators import RegisterModelOperator
from airflow_provider_dnntrain.operators.register import model_asset


@pytest.fixture(autouse=True)
def _db(airflow_db):
    return airflow_db


def asset_events(uri: str) -> list[dict]:
    from airflow.models.asset import AssetEvent, AssetModel
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        query = select(AssetEvent).join(AssetModel, AssetEvent.asset_id == AssetModel.id)
        return [event.extra for event in session.scalars(query.where(AssetModel.uri == uri))]


def test_a_registered_version_loads_keeps_azures_names_and_is_an_asset_event(tmp_path):
    import mlflow
    import numpy as np

    dag_run = load_dag(TEST_DAGS, "dnntrain_test_register_model").test(run_conf={"suffix": "conf"})
    assert dag_run.state == "success"
    version, train = xcom(dag_run, "register"), xcom(dag_run, "train")
    client = tracking.client(tracking.resolve_tracking_uri())
    tags = client.get_model_version("tiny", str(version)).tags
    assert tags["framework"] == "PyTorch" and tags["framework_version"] == "2.13.0"
    assert json.loads(tags["resource_configuration"]) == {"cpu": 0.5, "memory_in_gb": 1.0}
    assert tags["model_format"] == "torchscript" and tags["requirements"] == "torch==2.13.0"  # as named

    # Not through mlflow.set_tracking_uri: it sets MLFLOW_TRACKING_URI for every process started later.
    model = mlflow.pyfunc.load_model(
        tracking.download_model(tracking.resolve_tracking_uri(), "tiny", version, tmp_path)
    )
    rows = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]], dtype=np.float32)  # the signature's type
    np.testing.assert_allclose(model.predict(rows), [[12.0], [8.0]])

    (event,) = asset_events("model://tiny/")
    assert event["version"] == version and event["model_uri"] == f"models:/tiny/{version}"
    assert event["run_id"] == train["run_id"] and event["tracking_run_id"] == train["tracking_run_id"]
    # A name known only at run time is emitted through the alias, as the Asset of that name.
    templated = xcom(dag_run, "register_templated")
    (event,) = asset_events("model://tiny-conf/")
    assert event["version"] == templated and event["model_uri"] == f"models:/tiny-conf/{templated}"
    assert task_instance(dag_run, "register_templated").state == "success"
    named = xcom(dag_run, "register_file")
    assert client.get_model_version("tiny-file", str(named)).tags["model_format"] == "torchscript"


def test_an_unknown_model_format_or_resource_is_refused_when_the_dag_is_parsed():
    with pytest.raises(ValueError, match="model_format: 'onnx' is not one of auto, keras"):
        RegisterModelOperator(task_id="r", run_id="x", model_name="m", model_format="onnx")
    with pytest.raises(ValueError, match="memory_in_gb"):
        RegisterModelOperator(
            task_id="r", run_id="x", model_name="m", resource_configuration={"memory_in_gb": -1}
        )
    assert model_asset("digits").uri == "model://digits/"
