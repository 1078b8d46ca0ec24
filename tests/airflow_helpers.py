"""Run DAGs the way Airflow does: ``dag.test()`` against the real metadata DB."""

from __future__ import annotations

from typing import Any

EXAMPLES_BUNDLE = "dags-folder"


def register_dag(dag) -> None:
    """Serialize a DAG defined inside a test so that ``dag.test()`` can find its version."""
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    bag = DagBag(dag_folder="/dev/null")
    bag.bag_dag(dag)
    sync_bag_to_db(bag, EXAMPLES_BUNDLE, None)


def run_dag(dag, conf: dict | None = None, **kwargs):
    return dag.test(run_conf=conf, **kwargs)


def task_instance(dag_run, task_id: str):
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)


def xcom(dag_run, task_id: str, key: str = "return_value") -> Any:
    from airflow.models.xcom import XComModel
    from airflow.settings import Session
    from sqlalchemy import select

    with Session() as session:
        row = session.scalars(
            select(XComModel).where(
                XComModel.dag_id == dag_run.dag_id,
                XComModel.run_id == dag_run.run_id,
                XComModel.task_id == task_id,
                XComModel.key == key,
            )
        ).first()
        return None if row is None else XComModel.deserialize_value(row)
