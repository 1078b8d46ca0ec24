"""A GPU job is refused before anything starts when its host has too few GPUs (nvidia-smi -L)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from airflow_provider_dnntrain.backends.common.gpus import listed_gpus, local_gpus
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TrainingJob

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
# What nvidia-smi -L prints on a machine with two GPUs.
TWO_GPUS = """\
GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1c9a7e0e-4a1e-6d2f-9b58-0e3e2f9a1b11)
  MIG 1g.5gb Device 0: (UUID: MIG-4b8e1b7e-0b1e-5a7e-8f64-6f8c3e2b9a10)
GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-2d8b6f1f-5b2f-7e3a-8c69-1f4f3a0b2c22)
"""


def test_nvidia_smi_lists_one_line_per_gpu():
    assert listed_gpus(TWO_GPUS) == 2
    assert listed_gpus("") == 0


def gpu_job(workers: int) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(SCRIPTS),
        entry_script="replica.py",
        distribution=MultiWorkerMirrored(worker_count=workers),
        resources={"use_gpu": True},
    )


def test_a_host_without_gpus_refuses_the_job_saying_why(tmp_path):
    assert shutil.which("nvidia-smi") is None, "this test is about a machine without GPUs"
    launcher = LocalLauncher(work_root=str(tmp_path))
    job = gpu_job(2)
    with pytest.raises(ValueError) as refused:
        launcher.submit(job, launcher.plan(job, "gpu-none"), extra_env={})
    assert str(refused.value) == (
        "use_gpu: the job needs 2 GPU(s) on this host (worker-0: 0, worker-1: 1), which has 0; "
        "nvidia-smi: not found; run it where there are enough, with fewer processes, or with use_gpu=False"
    )
    assert not launcher.run_dir("gpu-none").exists()  # nothing was started, nothing written


def test_a_host_with_too_few_gpus_says_how_many_it_has(tmp_path, monkeypatch):
    # This machine has no GPU: an nvidia-smi that prints what the real one prints with one.
    tool = tmp_path / "bin" / "nvidia-smi"
    tool.parent.mkdir()
    tool.write_text(f"#!/bin/sh\nprintf '%s' '{TWO_GPUS.splitlines()[0]}\n'\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tool.parent}{os.pathsep}{os.environ['PATH']}")
    assert local_gpus() == (1, "nvidia-smi -L lists no GPU")
    launcher = LocalLauncher(work_root=str(tmp_path))
    job = gpu_job(3)
    with pytest.raises(
        ValueError,
        match=r"needs 3 GPU\(s\) on this host \(worker-0: 0, worker-1: 1, worker-2: 2\), which has 1; run",
    ):
        launcher.submit(job, launcher.plan(job, "gpu-few"), extra_env={})
