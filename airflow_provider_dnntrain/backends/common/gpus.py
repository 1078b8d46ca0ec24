"""Whether a host has the GPUs a plan gives its replicas there, as ``nvidia-smi -L`` lists them; an
error that says how many are needed, by which replicas, and what the host has, before anything starts."""

from __future__ import annotations

import shutil
import subprocess

from airflow_provider_dnntrain.topology import JobPlan
from airflow_provider_dnntrain.topology.gpus import GPUS_VAR, VISIBLE_DEVICES_VAR, gpus_by_host

LIST_GPUS = ("nvidia-smi", "-L")  # "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-...)" per device


def listed_gpus(output: str) -> int:
    return sum(line.startswith("GPU ") for line in output.splitlines())


def local_gpus() -> tuple[int, str]:
    """This host's GPUs, and when there are none, why."""
    if shutil.which(LIST_GPUS[0]) is None:
        return 0, "nvidia-smi: not found"
    try:
        done = subprocess.run(LIST_GPUS, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        return 0, f"nvidia-smi: {error}"
    if done.returncode != 0:
        return 0, f"nvidia-smi -L: {(done.stderr or done.stdout).strip() or f'exit code {done.returncode}'}"
    return listed_gpus(done.stdout), "nvidia-smi -L lists no GPU"


def check_host_gpus(plan: JobPlan, host: str, label: str, found: tuple[int, str]) -> None:
    """``ValueError`` naming ``use_gpu`` if ``host`` (``label`` in messages) has fewer GPUs than the
    plan's replicas there take."""
    needed = gpus_by_host(plan).get(host, 0)
    available, why = found
    if needed <= available:
        return
    taking = ", ".join(  # a runner's ranks take its devices on each of its nodes
        f"{r.name}: {r.env[VISIBLE_DEVICES_VAR]}"
        for r in plan.replicas
        if (r.host == host or host in plan.hosts) and int(r.env.get(GPUS_VAR, "0"))
    )
    detail = f"; {why}" if available == 0 else ""
    raise ValueError(
        f"use_gpu: the job needs {needed} GPU(s) on {label} ({taking}), which has {available}{detail}; "
        "run it where there are enough, with fewer processes, or with use_gpu=False"
    )
