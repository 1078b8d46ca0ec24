"""Run DAGs the way Airflow does: ``dag.test()`` against the real metadata DB."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TEST_DAGS = Path(__file__).resolve().parent / "dags"
EXAMPLE_DAGS = Path(__file__).resolve().parents[1] / "dags"
BUNDLE = "dags-folder"


def load_dag(folder: Path, dag_id: str):
    """Parse a DAG folder like the DAG processor and store its DAGs, so ``dag.test()`` finds them."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    DagBundlesManager().sync_bundles_to_db()
    bag = DagBag(dag_folder=str(folder))
    assert not bag.import_errors, bag.import_errors
    sync_bag_to_db(bag, BUNDLE, None)
    return bag.get_dag(dag_id)


def task_instance(dag_run, task_id: str):
    return next(ti for ti in dag_run.get_task_instances() if ti.task_id == task_id)


def _row_of(model, dag_run, task_id: str, **filters):
    from airflow.settings import Session
    from sqlalchemy import select

    conditions = [model.dag_id == dag_run.dag_id, model.run_id == dag_run.run_id, model.task_id == task_id]
    conditions += [getattr(model, column) == value for column, value in filters.items()]
    with Session() as session:
        row = session.scalars(select(model).where(*conditions)).first()
        session.expunge_all()
        return row


def xcom(dag_run, task_id: str, key: str = "return_value", map_index: int = -1) -> Any:
    from airflow.models.xcom import XComModel

    row = _row_of(XComModel, dag_run, task_id, key=key, map_index=map_index)
    return None if row is None else XComModel.deserialize_value(row)


def rendered_fields(dag_run, task_id: str) -> dict:
    from airflow.models.renderedtifields import RenderedTaskInstanceFields

    return _row_of(RenderedTaskInstanceFields, dag_run, task_id).rendered_fields


def job_processes(run_id_prefix: str) -> list:
    """Every live process of the machine that belongs to a training run whose id starts with
    ``run_id_prefix`` (launchers give each replica, and so everything it starts, DNNTRAIN_RUN_ID)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                continue
            if process.environ().get("DNNTRAIN_RUN_ID", "").startswith(run_id_prefix):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def wait_until_gone(run_id_prefix: str, timeout: float) -> list:
    import time

    deadline = time.monotonic() + timeout
    while (left := job_processes(run_id_prefix)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def wait_for(condition, timeout: float, what: str):
    """``condition()``'s first true value, polled; fails naming ``what`` after ``timeout`` seconds."""
    import time

    deadline = time.monotonic() + timeout
    while not (result := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result
