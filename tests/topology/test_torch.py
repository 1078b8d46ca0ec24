from __future__ import annotations

from airflow_provider_dnntrain.spec import TorchDistributed, TrainingJob
from airflow_provider_dnntrain.topology import FixedPortPlacement, render_plan

PLACEMENT = FixedPortPlacement(lambda role, index: f"node{index}")


def torch_job(distribution) -> TrainingJob:
    return TrainingJob(
        framework="pytorch",
        source_directory="src",
        entry_script="train.py",
        arguments={"--lr": "0.1"},
        distribution=distribution,
    )


def test_static_rendezvous_argv_and_env():
    plan = render_plan(
        torch_job(TorchDistributed(node_count=2, process_count_per_node=4)), "run-1", PLACEMENT, "py"
    )
    node1 = plan.replicas[1]
    assert node1.argv == [
        "py", "-m", "torch.distributed.run",
        "--nnodes", "2", "--nproc-per-node", "4",
        "--node-rank", "1", "--master-addr", "node0", "--master-port", "29500",
        "--tee", "3", "--log-dir", "logs/torchrun",
        "train.py", "--lr", "0.1",
    ]  # fmt: skip
    assert {k: node1.env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "NNODES")} == {
        "MASTER_ADDR": "node0",
        "MASTER_PORT": "29500",
        "NODE_RANK": "1",
        "NNODES": "2",
    }
    assert node1.ranks == [4, 5, 6, 7]
    assert plan.world_size == 8
    assert plan.success_policy == "all"
    assert [r.decides_success for r in plan.replicas] == [True, False]


def test_c10d_rendezvous_is_elastic():
    dist = TorchDistributed(
        node_count=3, process_count_per_node=1, rendezvous="c10d", min_nodes=2, port=29400
    )
    argv = render_plan(torch_job(dist), "run-9", PLACEMENT, "py").replicas[2].argv
    assert argv[:13] == [
        "py", "-m", "torch.distributed.run",
        "--nnodes", "2:3", "--nproc-per-node", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node0:29400", "--rdzv-id", "run-9",
    ]  # fmt: skip
    assert "--node-rank" not in argv


def test_max_restarts_is_passed():
    argv = render_plan(torch_job(TorchDistributed(max_restarts=2)), "r", PLACEMENT, "py").replicas[0].argv
    assert argv[argv.index("--max-restarts") + 1] == "2"
