"""DAGs the Docker serving tests run through dag.test(): the SSH serving tests' deploy and undeploy
DAGs with only ``serving=`` changed. The daemon is the environment's (``DOCKER_HOST``, set by the tests
to their own daemon)."""

from __future__ import annotations

import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.launchers import DockerServing
from airflow_provider_dnntrain.operators import DeployModelOperator, UndeployModelOperator

START = pendulum.datetime(2026, 1, 1, tz="UTC")

for dag_id, smoke_test in (
    ("dnntrain_docker_deploy", None),
    ("dnntrain_docker_deploy_wrong_rows", [[1.0, 2.0]]),
):
    with DAG(dag_id, schedule=None, start_date=START, params={"model": "models:/tiny-served/1"}):
        DeployModelOperator(
            task_id="deploy",
            model="{{ params.model }}",
            endpoint="tiny-docker",
            serving=DockerServing(startup_timeout=60),
            smoke_test=smoke_test,
        )

with DAG("dnntrain_docker_undeploy", schedule=None, start_date=START):
    UndeployModelOperator(task_id="undeploy", endpoint="tiny-docker", serving=DockerServing())
