from __future__ import annotations

import json

from airflow_provider_dnntrain.spec import Input, TrainingJob
from airflow_provider_dnntrain.topology import render_plan


def test_single_node_has_no_distribution_environment():
    job = TrainingJob(
        framework="pytorch",
        source_directory="src",
        entry_script="sub/train.py",
        arguments=["--x", "1"],
        environment={"variables": {"A": "1"}},
        inputs=[Input(name="digits", path="/data/digits", argument="--data")],
    )
    plan = render_plan(job, "r1", python="python3")
    (replica,) = plan.replicas
    assert replica.argv == ["python3", "sub/train.py", "--x", "1", "--data", "/data/digits"]
    assert replica.env["A"] == "1"
    assert replica.env["DNNTRAIN_INPUT_DIGITS"] == "/data/digits"
    assert not {"TF_CONFIG", "MASTER_ADDR", "RANK", "WORLD_SIZE"} & set(replica.env)
    assert plan.world_size == 1 and replica.decides_success


def test_secrets_never_appear_in_the_rendered_plan():
    job = TrainingJob(
        framework="tensorflow",
        source_directory="src",
        entry_script="t.py",
        distribution={"kind": "multi_worker_mirrored", "worker_count": 2},
        environment={"secrets": {"API_TOKEN": "hunter2-very-secret"}},
    )
    plan = render_plan(job, "r1")
    rendered = plan.to_json()
    assert "hunter2-very-secret" not in rendered
    assert "hunter2-very-secret" not in repr(job)
    assert all(r["env"]["API_TOKEN"] == "***" for r in json.loads(rendered)["replicas"])
