"""Pure rendering of a :class:`TrainingJob` into a :class:`JobPlan`. No I/O, no Airflow."""

from __future__ import annotations

import sys
from collections.abc import Callable

from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology.gpus import place_gpus
from airflow_provider_dnntrain.topology.horovod import render_horovod_plan
from airflow_provider_dnntrain.topology.plan import (
    Endpoint,
    FixedPortPlacement,
    JobPlan,
    Placement,
    Replica,
    base_env,
    script_argv,
)
from airflow_provider_dnntrain.topology.tensorflow import render_tensorflow_plan
from airflow_provider_dnntrain.topology.torch import render_torch_plan

__all__ = [
    "Endpoint",
    "FixedPortPlacement",
    "JobPlan",
    "Placement",
    "Replica",
    "placeholder_placement",
    "render_plan",
]


def placeholder_placement() -> FixedPortPlacement:
    """Default ports on placeholder host names: what the topology is, not where it will land."""
    return FixedPortPlacement(lambda role, index: f"{role}-{index}")


def render_single_plan(job: TrainingJob, run_id: str, placement: Placement, python: str) -> JobPlan:
    endpoint = placement.endpoint("worker", 0, 0)
    replica = Replica(
        role="worker",
        index=0,
        host=endpoint.host,
        port=None,
        argv=script_argv(job, python),
        env=base_env(job, run_id, "worker", 0),
        ranks=[0],
        decides_success=True,
    )
    return JobPlan(
        run_id=run_id,
        framework=job.framework,
        distribution="single",
        success_policy="all",
        replicas=[replica],
        world_size=1,
        secret_names=sorted(job.environment.secrets),
    )


_RENDERERS: dict[str, Callable[[TrainingJob, str, Placement, str], JobPlan]] = {
    "single": render_single_plan,
    "parameter_server": render_tensorflow_plan,
    "multi_worker_mirrored": render_tensorflow_plan,
    "torch_distributed": render_torch_plan,
    "horovod": render_horovod_plan,
}


def render_plan(
    job: TrainingJob, run_id: str, placement: Placement | None = None, python: str | None = None
) -> JobPlan:
    """Render every replica of ``job``. ``python`` defaults to the job's interpreter, then ours."""
    interpreter = python or job.environment.python or sys.executable
    plan = _RENDERERS[job.distribution.kind](job, run_id, placement or FixedPortPlacement(), interpreter)
    return place_gpus(job, plan)
