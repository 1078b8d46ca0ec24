"""A training task's dry run: its plan (and a backend's objects) with the templates rendered in the
context ``airflow tasks render`` would build - without a metadata database - for a given ``conf`` and
logical date."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import yaml

from airflow_provider_dnntrain.operators.job_fields import JOB_FIELDS
from airflow_provider_dnntrain.run_id import make_run_id


def preview_context(task, conf: dict[str, Any] | None, logical_date: datetime | None) -> dict[str, Any]:
    """The context a manual run with ``conf`` at ``logical_date`` would render this task with
    (``params`` merged with ``conf`` as the DAG allows, ``ds``, ``dag_run.conf``, macros...)."""
    from airflow.sdk.api.datamodels._generated import DagRun, TIRunContext
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    when = logical_date or datetime.now(timezone.utc)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    run_id = f"manual__{when.isoformat()}"
    dag_run = DagRun(
        dag_id=task.dag_id,
        run_id=run_id,
        logical_date=when,
        data_interval_start=when,
        data_interval_end=when,
        run_after=when,
        start_date=when,
        end_date=None,
        run_type="manual",
        state="running",
        conf=conf or {},
        consumed_asset_events=[],
        partition_key=None,
    )
    ti = RuntimeTaskInstance.model_construct(
        id=uuid.uuid4(),
        task_id=task.task_id,
        dag_id=task.dag_id,
        run_id=run_id,
        try_number=1,
        map_index=-1,
        dag_version_id=uuid.uuid4(),
        max_tries=task.retries,
        task=task,
        _ti_context_from_server=TIRunContext(dag_run=dag_run, max_tries=task.retries),
    )
    return ti.get_template_context()


def dry_run(task, conf: dict[str, Any] | None, logical_date: datetime | None) -> dict:
    """What ``task.dry_run()`` prints and returns (see there)."""
    fields = None
    if task.has_dag():
        context = preview_context(task, dict(conf or {}), logical_date)
        jinja_env = task.get_template_env()
        fields = {
            name: task.render_template(getattr(task, name), context, jinja_env, set())
            for name in (*JOB_FIELDS, "inputs")
        }
    job = task.build_job(fields)
    task._check_source(job)
    run_id = make_run_id(task.dag_id, task.task_id, "dry-run", -1, 1)
    launcher = task._launcher()
    plan = launcher.preview(job, run_id)
    print(plan.to_json())
    shown = plan.to_dict()
    objects = launcher.preview_objects(job, run_id)
    if objects is not None:
        print(yaml.safe_dump_all(objects, sort_keys=False))
        shown["objects"] = objects
    return shown
