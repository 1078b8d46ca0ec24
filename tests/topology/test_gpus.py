"""use_gpu=True: each process a device of its own, distinct among the replicas that share a host."""

from __future__ import annotations

import pytest

from airflow_provider_dnntrain.spec import (
    Horovod,
    MultiWorkerMirrored,
    ParameterServer,
    SingleNode,
    TorchDistributed,
    TrainingJob,
)
from airflow_provider_dnntrain.topology import FixedPortPlacement, render_plan
from airflow_provider_dnntrain.topology.gpus import gpus_by_host

ONE_HOST = FixedPortPlacement()  # every replica on 127.0.0.1, as the local launcher places them
HOST_EACH = FixedPortPlacement(lambda role, index: f"{role}-{index}")


def gpu_job(framework: str, distribution, use_gpu: bool = True) -> TrainingJob:
    return TrainingJob(
        framework=framework,
        source_directory="src",
        entry_script="train.py",
        distribution=distribution,
        resources={"use_gpu": use_gpu},
    )


def devices(plan) -> dict[str, str]:
    return {r.name: r.env["CUDA_VISIBLE_DEVICES"] for r in plan.replicas}


@pytest.mark.parametrize(
    ("framework", "distribution", "on_one_host", "on_a_host_each"),
    [
        ("pytorch", SingleNode(), {"worker-0": "0"}, {"worker-0": "0"}),
        (
            "tensorflow",
            ParameterServer(worker_count=2, parameter_server_count=1),
            {"chief-0": "0", "ps-0": "", "worker-0": "1", "worker-1": "2"},  # parameter servers: none
            {"chief-0": "0", "ps-0": "", "worker-0": "0", "worker-1": "0"},
        ),
        (
            "tensorflow",
            MultiWorkerMirrored(worker_count=2),
            {"worker-0": "0", "worker-1": "1"},
            {"worker-0": "0", "worker-1": "0"},
        ),
        (  # torchrun's processes take cuda:LOCAL_RANK among their node's devices
            "pytorch",
            TorchDistributed(node_count=2, process_count_per_node=2),
            {"node-0": "0,1", "node-1": "2,3"},
            {"node-0": "0,1", "node-1": "0,1"},
        ),
        (  # Horovod's ranks take hvd.local_rank() among theirs
            "pytorch",
            Horovod(process_count_per_node=3),
            {"launcher-0": "0,1,2"},
            {"launcher-0": "0,1,2"},
        ),
    ],
)
def test_each_process_gets_a_device_of_its_own(framework, distribution, on_one_host, on_a_host_each):
    job = gpu_job(framework, distribution)
    shared = render_plan(job, "r", ONE_HOST)
    assert devices(shared) == on_one_host
    assert gpus_by_host(shared) == {"127.0.0.1": sum(len(d.split(",")) for d in on_one_host.values() if d)}
    assert devices(render_plan(job, "r", HOST_EACH)) == on_a_host_each


def test_without_use_gpu_nothing_is_set():
    plan = render_plan(gpu_job("pytorch", TorchDistributed(node_count=2), use_gpu=False), "r", ONE_HOST)
    assert not any(
        "CUDA_VISIBLE_DEVICES" in r.env or "TORCH_NCCL_ASYNC_ERROR_HANDLING" in r.env for r in plan.replicas
    )
    assert gpus_by_host(plan) == {}


def test_nccl_settings_follow_the_frameworks_docs_and_reach_every_rank():
    ddp = render_plan(gpu_job("pytorch", TorchDistributed(node_count=2)), "r", HOST_EACH)
    assert all(r.env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "1" for r in ddp.replicas)
    dist = Horovod(node_count=2, runner="mpirun", controller="mpi", network_interface="eth0")
    (launcher,) = render_plan(gpu_job("pytorch", dist), "r", HOST_EACH).replicas
    assert launcher.env["NCCL_SOCKET_IFNAME"] == "eth0"
    exported = {launcher.argv[i + 1] for i, arg in enumerate(launcher.argv) if arg == "-x"}
    assert {
        "CUDA_VISIBLE_DEVICES",
        "DNNTRAIN_GPUS",
        "NCCL_SOCKET_IFNAME",
    } <= exported  # mpirun passes them on


def test_a_runner_needs_its_ranks_devices_on_each_of_its_nodes():
    dist = Horovod(node_count=3, process_count_per_node=2)
    plan = render_plan(gpu_job("pytorch", dist), "r", FixedPortPlacement(lambda role, index: f"h{index}"))
    assert gpus_by_host(plan) == {"h0": 2, "h1": 2, "h2": 2}
