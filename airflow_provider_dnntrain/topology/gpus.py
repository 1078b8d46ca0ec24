"""GPUs for a job with ``use_gpu=True``: how many each replica takes, and which devices it sees.

Each training process gets a device of its own. A TensorFlow replica is one process: one device
(parameter servers none: they hold variables, not compute). A torchrun node's processes pick
``cuda:LOCAL_RANK`` among the node's devices, as torch's DDP docs have it; Horovod's ranks pick
``hvd.local_rank()`` among theirs, as Horovod's do. Replicas that share a host get consecutive,
distinct devices (``CUDA_VISIBLE_DEVICES``); a launcher checks the host has that many.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from airflow_provider_dnntrain.spec import Horovod, TrainingJob
from airflow_provider_dnntrain.topology.plan import JobPlan, Replica

VISIBLE_DEVICES_VAR = "CUDA_VISIBLE_DEVICES"
GPUS_VAR = "DNNTRAIN_GPUS"  # how many devices the replica was given (what a launcher checks)


def gpu_count(job: TrainingJob, replica: Replica) -> int:
    """The devices a replica's processes use."""
    if replica.role == "ps":
        return 0
    if isinstance(job.distribution, Horovod):  # the runner's node: its share of the ranks
        return job.distribution.process_count_per_node
    return max(1, len(replica.ranks)) if replica.role == "node" else 1


def place_gpus(job: TrainingJob, plan: JobPlan) -> JobPlan:
    """The plan with each replica's devices: consecutive per host, in the plan's order."""
    if not job.resources.use_gpu:
        return plan
    taken: Counter[str] = Counter()
    replicas = []
    for replica in plan.replicas:
        count = gpu_count(job, replica)
        first = taken[replica.host]
        taken[replica.host] += count
        devices = ",".join(str(device) for device in range(first, first + count))
        env = {**replica.env, VISIBLE_DEVICES_VAR: devices, GPUS_VAR: str(count)}
        env.update(_collective_env(job))
        replicas.append(dataclasses.replace(replica, env=env))
    return dataclasses.replace(plan, replicas=replicas)


def gpu_vars(job: TrainingJob) -> list[str]:
    """The variables :func:`place_gpus` sets (for a runner to pass on to ranks on other hosts)."""
    if not job.resources.use_gpu:
        return []
    return [VISIBLE_DEVICES_VAR, GPUS_VAR, *_collective_env(job)]


def _collective_env(job: TrainingJob) -> dict[str, str]:
    """NCCL settings the frameworks' docs recommend: fail fast on a collective that hangs (torch), and
    the interface the job was told to use."""
    env = {}
    if job.framework == "pytorch" and job.distribution.kind == "torch_distributed":
        env["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"
    interface = getattr(job.distribution, "network_interface", None)
    if interface:
        env["NCCL_SOCKET_IFNAME"] = interface
    return env


def gpus_by_host(plan: JobPlan) -> dict[str, int]:
    """How many devices the plan takes on each host (a runner's: on each of its nodes)."""
    needed: Counter[str] = Counter()
    for replica in plan.replicas:
        for host in plan.hosts or [replica.host]:
            needed[host] += int(replica.env.get(GPUS_VAR, "0"))
    return {host: count for host, count in needed.items() if count}
