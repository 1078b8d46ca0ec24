"""TensorFlow topologies: parameter server and MultiWorkerMirrored, both driven by ``TF_CONFIG``."""

from __future__ import annotations

import json

from airflow_provider_dnntrain.spec import MultiWorkerMirrored, ParameterServer, TrainingJob
from airflow_provider_dnntrain.topology.plan import (
    JobPlan,
    Placement,
    Replica,
    base_env,
    script_argv,
)

# Cluster-map keys appear in this order; the evaluator is never part of the cluster.
_CLUSTER_ROLES = ("chief", "ps", "worker")


def render_tf_config(cluster: dict[str, list[str]], task_type: str, task_index: int) -> str:
    ordered = {role: cluster[role] for role in _CLUSTER_ROLES if cluster.get(role)}
    config = {
        "cluster": ordered,
        "task": {"type": task_type, "index": task_index},
        "environment": "cloud",
    }
    return json.dumps(config, separators=(",", ":"))


def _role_counts(dist: ParameterServer | MultiWorkerMirrored) -> dict[str, int]:
    if isinstance(dist, MultiWorkerMirrored):
        return {"worker": dist.worker_count}
    return {
        "chief": int(dist.chief),
        "ps": dist.parameter_server_count,
        "worker": dist.worker_count,
        "evaluator": int(dist.evaluator),
    }


def render_tensorflow_plan(job: TrainingJob, run_id: str, placement: Placement, python: str) -> JobPlan:
    dist = job.distribution
    assert isinstance(dist, (ParameterServer, MultiWorkerMirrored))
    counts = _role_counts(dist)
    endpoints = {
        role: [placement.endpoint(role, i, dist.port) for i in range(count)] for role, count in counts.items()
    }
    cluster = {role: [str(e) for e in endpoints[role]] for role in _CLUSTER_ROLES if role in endpoints}
    decider = "chief" if counts.get("chief") else "worker"
    replicas = []
    for role in ("chief", "ps", "worker", "evaluator"):
        for index, endpoint in enumerate(endpoints.get(role, [])):
            env = base_env(job, run_id, role, index)
            env["TF_CONFIG"] = render_tf_config(cluster, role, index)
            replicas.append(
                Replica(
                    role=role,
                    index=index,
                    host=endpoint.host,
                    port=endpoint.port if role != "evaluator" else None,
                    argv=script_argv(job, python),
                    env=env,
                    decides_success=(role == decider and index == 0),
                    runs_until_stopped=(role == "ps"),
                )
            )
    is_ps = isinstance(dist, ParameterServer)
    return JobPlan(
        run_id=run_id,
        framework=job.framework,
        distribution=dist.kind,
        success_policy="chief" if is_ps else "all",
        replicas=replicas,
        world_size=sum(n for role, n in counts.items() if role != "evaluator"),
        secret_names=sorted(job.environment.secrets),
    )
