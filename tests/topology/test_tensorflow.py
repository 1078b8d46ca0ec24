from __future__ import annotations

import json

from airflow_provider_dnntrain.spec import MultiWorkerMirrored, ParameterServer, TrainingJob
from airflow_provider_dnntrain.topology import FixedPortPlacement, render_plan


def k8s_style_placement():
    return FixedPortPlacement(lambda role, index: f"job-{role}-{index}.job")


def tf_job(distribution, **extra) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory="src",
        entry_script="train.py",
        arguments=["--epochs", "2"],
        distribution=distribution,
        **extra,
    )


def test_parameter_server_tf_config_matches_spec_exactly():
    dist = ParameterServer(worker_count=2, parameter_server_count=2, chief=True)
    plan = render_plan(tf_job(dist), "job", k8s_style_placement(), python="python")
    assert [r.name for r in plan.replicas] == ["chief-0", "ps-0", "ps-1", "worker-0", "worker-1"]
    worker1 = plan.replica("worker-1")
    assert worker1.env["TF_CONFIG"] == (
        '{"cluster":{"chief":["job-chief-0.job:2222"],'
        '"ps":["job-ps-0.job:2222","job-ps-1.job:2222"],'
        '"worker":["job-worker-0.job:2222","job-worker-1.job:2222"]},'
        '"task":{"type":"worker","index":1},"environment":"cloud"}'
    )
    assert worker1.argv == ["python", "train.py", "--epochs", "2"]
    assert (worker1.host, worker1.port) == ("job-worker-1.job", 2222)


def test_parameter_server_roles_and_success_policy():
    plan = render_plan(tf_job(ParameterServer(worker_count=2)), "job", k8s_style_placement(), "python")
    assert plan.success_policy == "chief"
    assert [r.name for r in plan.replicas if r.decides_success] == ["chief-0"]
    assert [r.name for r in plan.replicas if r.runs_until_stopped] == ["ps-0"]
    assert plan.world_size == 4
    assert plan.chief.name == "chief-0"


def test_without_chief_worker_zero_decides():
    dist = ParameterServer(worker_count=2, chief=False)
    plan = render_plan(tf_job(dist), "job", k8s_style_placement(), "python")
    config = json.loads(plan.replica("worker-0").env["TF_CONFIG"])
    assert list(config["cluster"]) == ["ps", "worker"]
    assert [r.name for r in plan.replicas if r.decides_success] == ["worker-0"]


def test_evaluator_is_outside_the_cluster_map():
    dist = ParameterServer(worker_count=1, evaluator=True)
    plan = render_plan(tf_job(dist), "job", k8s_style_placement(), "python")
    evaluator = plan.replica("evaluator-0")
    config = json.loads(evaluator.env["TF_CONFIG"])
    assert config["task"] == {"type": "evaluator", "index": 0}
    assert "evaluator" not in config["cluster"]
    assert all("evaluator" not in json.loads(r.env["TF_CONFIG"])["cluster"] for r in plan.replicas)
    assert evaluator.port is None
    assert plan.world_size == 3


def test_multi_worker_mirrored_tf_config_matches_spec_exactly():
    placement = FixedPortPlacement(lambda role, index: f"h{index}")
    plan = render_plan(tf_job(MultiWorkerMirrored(worker_count=2)), "job", placement, "python")
    assert [json.loads(r.env["TF_CONFIG"]) for r in plan.replicas] == [
        {
            "cluster": {"worker": ["h0:2222", "h1:2222"]},
            "task": {"type": "worker", "index": i},
            "environment": "cloud",
        }
        for i in range(2)
    ]
    assert plan.success_policy == "all"
    assert not any(r.runs_until_stopped for r in plan.replicas)


def test_custom_port_is_used_everywhere():
    plan = render_plan(
        tf_job(MultiWorkerMirrored(worker_count=2, port=3000)), "job", k8s_style_placement(), "py"
    )
    assert json.loads(plan.replicas[0].env["TF_CONFIG"])["cluster"]["worker"] == [
        "job-worker-0.job:3000",
        "job-worker-1.job:3000",
    ]


def test_every_replica_gets_run_identity_and_output_dir():
    plan = render_plan(tf_job(ParameterServer()), "run-7", k8s_style_placement(), "python")
    for replica in plan.replicas:
        assert replica.env["DNNTRAIN_RUN_ID"] == "run-7"
        assert replica.env["DNNTRAIN_ROLE"] == replica.role
        assert replica.env["DNNTRAIN_REPLICA_INDEX"] == str(replica.index)
        assert replica.env["DNNTRAIN_OUTPUT_DIR"] == "outputs"
