"""The containers a Docker run asks the daemon for (pure): their GPUs, and a Horovod runner's nodes."""

from __future__ import annotations

from pathlib import Path

import pytest

from airflow_provider_dnntrain.backends.docker import containers as specs
from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher
from airflow_provider_dnntrain.spec import Horovod, ParameterServer, Resources, TorchDistributed, TrainingJob

SCRIPTS = str(Path(__file__).resolve().parents[3] / "dags" / "scripts")


def containers(distribution, framework: str = "pytorch", use_gpu: bool = True) -> dict[str, dict]:
    job = TrainingJob(
        framework=framework, source_directory=SCRIPTS, entry_script="digits.py", distribution=distribution,
        resources=Resources(use_gpu=use_gpu),
    )  # fmt: skip
    plan = DockerLauncher().plan(job, "run-1")
    return specs.run_containers(plan, image="image", python="python", network="run-1", env={})


@pytest.mark.parametrize(
    ("distribution", "framework", "gpus"),
    [
        (ParameterServer(worker_count=2, parameter_server_count=1), "tensorflow",
         {"chief-0": 1, "ps-0": 0, "worker-0": 1, "worker-1": 1}),
        (TorchDistributed(node_count=2, process_count_per_node=3), "pytorch", {"node-0": 3, "node-1": 3}),
        (Horovod(node_count=2, process_count_per_node=2), "pytorch", {"launcher-0": 2, "node-1": 2}),
    ],
    ids=["parameter-servers-none", "torchrun-one-per-process", "horovod-each-node-its-ranks"],
)  # fmt: skip
def test_each_container_asks_for_a_gpu_per_process_it_runs(distribution, framework, gpus):
    asked = {
        name: sum(request["Count"] for request in config.get("device_requests", []))
        for name, config in containers(distribution, framework).items()
    }
    assert asked == gpus


def test_without_use_gpu_no_container_asks_for_devices():
    found = containers(TorchDistributed(node_count=2, process_count_per_node=2), use_gpu=False)
    assert all("device_requests" not in config for config in found.values())


def test_a_horovod_runner_reaches_its_other_nodes_which_serve_ssh():
    found = containers(Horovod(node_count=3, process_count_per_node=1), use_gpu=False)
    assert list(found) == ["launcher-0", "node-1", "node-2"]
    runner = found["launcher-0"]
    assert runner["networking_config"] == {"run-1": {"Aliases": ["run-1-node-0"]}}  # the hosts' name for it
    assert runner["command"][3:7] == ["--ssh-peer", "run-1-node-1", "--ssh-peer", "run-1-node-2"]
    for name in ("node-1", "node-2"):
        assert found[name]["name"] == found[name]["hostname"] == f"run-1-{name}"
        assert found[name]["command"][2:5] == ["sshd", "--port", "2222"]
