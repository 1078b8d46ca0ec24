"""PyTorch DDP: one ``torchrun`` per node, static or c10d rendezvous."""

from __future__ import annotations

from airflow_provider_dnntrain.spec import TorchDistributed, TrainingJob
from airflow_provider_dnntrain.topology.plan import JobPlan, Placement, Replica, base_env


def render_torchrun_argv(
    job: TrainingJob, dist: TorchDistributed, python: str, node_rank: int, master: str, port: int, run_id: str
) -> list[str]:
    nnodes = f"{dist.min_nodes}:{dist.node_count}" if dist.min_nodes else str(dist.node_count)
    argv = [python, "-m", "torch.distributed.run", "--nnodes", nnodes]
    argv += ["--nproc-per-node", str(dist.process_count_per_node)]
    if dist.rendezvous == "c10d":
        argv += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"{master}:{port}", "--rdzv-id", run_id]
    else:
        argv += ["--node-rank", str(node_rank), "--master-addr", master, "--master-port", str(port)]
    # Whole lines per rank, prefixed "[default<local rank>]:", and a copy under the replica's ./logs.
    argv += ["--tee", "3", "--log-dir", "logs/torchrun"]
    if dist.max_restarts:
        argv += ["--max-restarts", str(dist.max_restarts)]
    return [*argv, job.entry_script, *job.argv()]


def render_torch_plan(job: TrainingJob, run_id: str, placement: Placement, python: str) -> JobPlan:
    dist = job.distribution
    assert isinstance(dist, TorchDistributed)
    per_node = dist.process_count_per_node
    endpoints = [placement.endpoint("node", i, dist.port) for i in range(dist.node_count)]
    master = endpoints[0]
    replicas = []
    for node_rank, endpoint in enumerate(endpoints):
        env = base_env(job, run_id, "node", node_rank)
        # torchrun sets RANK/LOCAL_RANK/WORLD_SIZE per process; these describe the node.
        env.update({"MASTER_ADDR": master.host, "MASTER_PORT": str(master.port)})
        env.update({"NODE_RANK": str(node_rank), "NNODES": str(dist.node_count)})
        replicas.append(
            Replica(
                role="node",
                index=node_rank,
                host=endpoint.host,
                port=master.port if node_rank == 0 else None,
                argv=render_torchrun_argv(job, dist, python, node_rank, master.host, master.port, run_id),
                env=env,
                ranks=list(range(node_rank * per_node, (node_rank + 1) * per_node)),
                decides_success=(node_rank == 0),
            )
        )
    return JobPlan(
        run_id=run_id,
        framework=job.framework,
        distribution=dist.kind,
        success_policy="all",
        replicas=replicas,
        world_size=dist.node_count * per_node,
        secret_names=sorted(job.environment.secrets),
    )
