"""Launch overhead of the local launcher against starting the same processes directly.

Not part of the test suite. Prints, per scenario, the median wall time of N runs each way and the
ratio launcher/direct. Run: .venv/bin/python benchmarks/launch_overhead.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.launchers import LocalLauncher
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TorchDistributed, TrainingJob

REPO = Path(__file__).resolve().parents[1]


def chatty_job(lines: int) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(REPO / "tests" / "scripts"),
        entry_script="replica.py",
        arguments=["--lines", str(lines)],
        distribution=MultiWorkerMirrored(worker_count=2),
    )


def ddp_job() -> TrainingJob:
    return TrainingJob(
        framework="pytorch",
        source_directory=str(REPO / "dags" / "scripts"),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "1"],
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
    )


def run_direct(job: TrainingJob, workdir: Path) -> float:
    """The same argv and environment, started by hand with output going to files (no snapshot)."""
    launcher = LocalLauncher(work_root=workdir)
    plan = launcher.plan(job, "direct")
    cwd = workdir / "direct-cwd"
    shutil.rmtree(cwd, ignore_errors=True)
    shutil.copytree(job.source_directory, cwd)
    (cwd / "logs").mkdir()
    started = time.perf_counter()
    procs = []
    for replica in plan.replicas:
        out = open(workdir / f"{replica.name}.log", "wb")  # noqa: SIM115
        env = {**os.environ, **replica.env}
        procs.append(subprocess.Popen(replica.argv, cwd=cwd, env=env, stdout=out, stderr=out))
    codes = [p.wait() for p in procs]
    elapsed = time.perf_counter() - started
    assert codes == [0] * len(codes), codes
    return elapsed


def run_launcher(job: TrainingJob, workdir: Path, run: int) -> float:
    launcher = LocalLauncher(work_root=workdir)
    started = time.perf_counter()
    handle = launcher.submit(job, launcher.plan(job, f"bench-{run}"), extra_env={})
    wait_for_job(launcher, handle, lambda line: None)
    launcher.collect_outputs(handle)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    scenarios = {
        "2 replicas, 20 lines each": chatty_job(20),
        "2 replicas, 200k lines each (log streaming)": chatty_job(200_000),
        "torchrun DDP 1x2, 1 epoch": ddp_job(),
    }
    print(f"{'scenario':48} {'direct s':>9} {'launcher s':>11} {'ratio':>6}")
    for name, job in scenarios.items():
        with tempfile.TemporaryDirectory() as tmp:
            direct = statistics.median(run_direct(job, Path(tmp)) for _ in range(args.repeats))
            launched = statistics.median(run_launcher(job, Path(tmp), i) for i in range(args.repeats))
        print(f"{name:48} {direct:9.3f} {launched:11.3f} {launched / direct:6.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
