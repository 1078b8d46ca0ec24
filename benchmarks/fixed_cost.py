"""Fixed cost of a training task against the script run directly with horovodrun.

Not part of the test suite. Runs the same 2-rank Horovod job (the PyTorch digits example, horovodrun
with Gloo) alternately:

- directly: ``horovodrun -np 2 ... python torch_horovod_digits.py`` in a copy of the scripts, logging
  to an MLflow run created beforehand (so the script does exactly the work it does under Airflow);
- as an Airflow task: ``PyTorchHorovodOperator`` triggered through the REST API of real Airflow
  components (api-server, scheduler with LocalExecutor, dag-processor, triggerer; as the tests start
  them), on the embedded MLflow store, timed as Airflow records the task (its start and end dates).

Prints each pair, then the medians, the ratio task/direct and the task's extra seconds, split into
before the launch (task start to the replicas' start) and after the last line (the replicas' last
output to the task's end), and the median of the pairs' differences (on a 2-core machine with the
Airflow services running, single runs of the same job vary by seconds: use enough repeats).
Run: .venv/bin/python benchmarks/fixed_cost.py [--epochs 18] [--repeats 3]
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
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "dags" / "scripts"
# The services' helper lives with the tests that use it too.
sys.path.insert(0, str(REPO / "tests"))
# One thread per rank on both sides: two ranks on two cores, no oversubscription noise.
JOB_ENV = {"OMP_NUM_THREADS": "1"}

DAG_FILE = f'''
import pendulum
from airflow.sdk import DAG
from airflow_provider_dnntrain.operators import PyTorchHorovodOperator

with DAG("bench_fixed_cost", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    PyTorchHorovodOperator(
        task_id="train",
        source_directory="{SCRIPTS}",
        entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "{{{{ dag_run.conf['epochs'] }}}}"],
        environment_variables={JOB_ENV!r},
        process_count_per_node=2,
        controller="gloo",
    )
'''


def run_direct(epochs: int, tracking_uri: str, run_id: str) -> float:
    """horovodrun by hand, in a fresh copy of the scripts, logging to a run that already exists."""
    workdir = Path(tempfile.mkdtemp(prefix="dnntrain-bench-direct-"))
    shutil.copytree(SCRIPTS, workdir, dirs_exist_ok=True)
    env = {**os.environ, **JOB_ENV, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_RUN_ID": run_id}
    command = [sys.executable, "-m", "horovod.runner.launch", "-np", "2", "-H", "localhost:2", "--gloo"]
    command += [sys.executable, "torch_horovod_digits.py", "--epochs", str(epochs)]
    started = time.perf_counter()
    subprocess.run(
        command, cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True
    )
    elapsed = time.perf_counter() - started
    shutil.rmtree(workdir)
    return elapsed


def run_task(services, epochs: int) -> tuple[float, float, float]:
    """Triggered through the REST API and run by the scheduler, in a task process as in production:
    (the task's duration as Airflow recorded it, seconds from its start to the replicas' start,
    seconds from their last line to its end)."""
    run_id = services.trigger("bench_fixed_cost", {"epochs": epochs})
    assert services.wait_for_run("bench_fixed_cost", run_id, timeout=600) == "success"
    task = services.task("bench_fixed_cost", run_id, "train")
    start, end = (datetime.fromisoformat(task[key]).timestamp() for key in ("start_date", "end_date"))
    job = services.xcom("bench_fixed_cost", run_id, "train")["run_id"]
    run_dir = services.home / "dnntrain" / "runs" / job
    launched = (run_dir / "launch.json").stat().st_mtime
    last_line = max(log.stat().st_mtime for log in (run_dir / "logs").glob("*.log"))
    return end - start, launched - start, end - last_line


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=18, help="a ~15 s job on 2 cores")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from airflow_services import AirflowServices

    from airflow_provider_dnntrain import tracking

    root = Path(tempfile.mkdtemp(prefix="dnntrain-bench-"))
    (root / "dags").mkdir()
    (root / "dags" / "bench_fixed_cost.py").write_text(DAG_FILE)
    services = AirflowServices(home=root / "home", dags_folder=root / "dags")
    services.start()
    try:
        run_task(services, 1)  # creates the embedded MLflow store, as the first training task does
        uri = f"sqlite:///{services.home / 'dnntrain' / 'mlflow.db'}"
        direct_run = tracking.start_run(uri, "bench-direct", "direct", {})
        tasks, directs = [], []
        for i in range(args.repeats):
            # Which side goes first alternates, so a drift in the machine's speed favours neither.
            if i % 2:
                tasks.append(run_task(services, args.epochs))
            directs.append(run_direct(args.epochs, uri, direct_run.mlflow_run_id))
            if not i % 2:
                tasks.append(run_task(services, args.epochs))
            print(
                f"run {i + 1}: direct {directs[-1]:6.2f} s   task {tasks[-1][0]:6.2f} s  "
                f"(before launch {tasks[-1][1]:.2f} s, after the last line {tasks[-1][2]:.2f} s)",
                flush=True,
            )
    finally:
        services.stop()
        shutil.rmtree(root, ignore_errors=True)
    direct, task = statistics.median(directs), statistics.median(t[0] for t in tasks)
    before, after = statistics.median(t[1] for t in tasks), statistics.median(t[2] for t in tasks)
    paired = statistics.median(t[0] - d for t, d in zip(tasks, directs, strict=True))
    print(
        f"median: direct {direct:.2f} s, task {task:.2f} s, ratio task/direct {task / direct:.3f}, "
        f"extra {task - direct:+.2f} s (before launch {before:.2f} s, after the last line {after:.2f} s); "
        f"median of the pairs' differences {paired:+.2f} s"
    )


if __name__ == "__main__":
    main()
