"""Metric logging against training time, per backend: a script that logs a metric every batch, its own
training loop timed, run directly and as a training task on each backend.

Not part of the test suite. The script does ``--batches`` batches of ``--batch-ms`` of work each and
calls ``mlflow.log_metric`` after every one (as a script that logs every batch does), then prints how
long its loop took. Run directly it logs to the embedded store's file on this machine (a run created
beforehand); as a task (``dag.test()``, tracking on) it logs through whatever its backend gives it:
the store itself (local), the store served through an SSH port forward (an sshd host in a network
namespace, tests/ssh_hosts.py), the store served to a pod (the fake cluster, tests/fake_kubernetes).
Prints the medians of the loop's time each way and the ratio task/direct per backend (also without the
first metric, which waits for a served store to start), and checks that every metric arrived. Needs
root (network namespaces).
Run: .venv/bin/python benchmarks/metric_logging.py [--batches 300] [--batch-ms 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOME = Path(tempfile.mkdtemp(prefix="dnntrain-bench-home-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{HOME / 'airflow.db'}",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
sys.path.insert(0, str(REPO / "tests"))

SCRIPTS = REPO / "tests" / "scripts"  # log_every_batch.py: the script, shared with a test
DAG = """
import json, pendulum
from airflow.sdk import DAG
from airflow_provider_dnntrain.launchers import KubernetesLauncher, LocalLauncher, SSHLauncher
from airflow_provider_dnntrain.operators import TensorFlowTrainOperator

LAUNCHERS = {{
    "local": lambda: LocalLauncher(),
    "ssh": lambda: SSHLauncher(ssh_conn_ids=["bench_ssh"]),
    "kubernetes": lambda: KubernetesLauncher(kubernetes_conn_id="bench_kubernetes", poll_interval=0.5),
}}
for backend, launcher in LAUNCHERS.items():
    with DAG(f"bench_metrics_{{backend}}", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
        TensorFlowTrainOperator(
            task_id="train", source_directory="{source}", entry_script="log_every_batch.py",
            arguments=["{batches}", "{batch_ms}"], launcher=launcher(),
        )
"""


def loop_seconds(text: str) -> tuple[float, float]:
    """The loop's time, and its time but for the first ``log_metric`` (which starts the run in MLflow,
    so waits for the store to answer: a served store that is still starting, through a task)."""
    loop = float(re.search(r"loop_seconds=([\d.]+)", text).group(1))
    return loop, loop - float(re.search(r"first_call=([\d.]+)", text).group(1))


def run_direct(source: Path, store: str, batches: int, batch_ms: int) -> tuple[float, float]:
    from airflow_provider_dnntrain import tracking

    run = tracking.start_run(store, "bench-direct", "direct", {})
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_RUN_ID": run.mlflow_run_id}
    env["DNNTRAIN_OUTPUT_DIR"] = str(HOME / "direct-outputs")  # not beside the script, in the repository
    argv = [sys.executable, "log_every_batch.py", str(batches), str(batch_ms)]
    done = subprocess.run(argv, cwd=source, env=env, capture_output=True, text=True, check=True)
    return loop_seconds(done.stdout)


def run_task(backend: str, batches: int) -> tuple[float, float]:
    from airflow_helpers import load_dag, xcom

    from airflow_provider_dnntrain import tracking

    dag_run = load_dag(HOME / "dags", f"bench_metrics_{backend}").test()
    assert dag_run.state == "success", backend
    result = xcom(dag_run, "train")
    client = tracking.client(result["tracking_uri"])
    arrived = client.get_metric_history(result["tracking_run_id"], "loss")
    assert len(arrived) == batches, f"{backend}: {len(arrived)} of {batches} metrics arrived"
    said = Path(client.download_artifacts(result["tracking_run_id"], "outputs/loop.txt")).read_text()
    print(f"{backend}: {said}", flush=True)
    return loop_seconds(said)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--batch-ms", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="local,ssh,kubernetes")
    args = parser.parse_args()

    from airflow.utils import db
    from fake_kubernetes import FakeCluster
    from ssh_hosts import SSHHosts

    from airflow_provider_dnntrain import tracking

    source = SCRIPTS
    (HOME / "dags").mkdir()
    dag = DAG.format(source=source, batches=args.batches, batch_ms=args.batch_ms)
    (HOME / "dags" / "bench_metrics.py").write_text(dag)
    db.resetdb()
    hosts = SSHHosts(HOME / "hosts", count=1).start()
    cluster = FakeCluster(HOME / "cluster").start()
    try:
        os.environ["AIRFLOW_CONN_BENCH_SSH"] = hosts.airflow_connection(hosts.hosts[0])
        os.environ["AIRFLOW_CONN_BENCH_KUBERNETES"] = cluster.airflow_connection()
        store = tracking.resolve_tracking_uri()
        results = {}
        for backend in args.backends.split(","):
            run_task(backend, args.batches)  # a first run: images, caches, the store's tables
            pairs = [(run_direct(source, store, args.batches, args.batch_ms), run_task(backend, args.batches))
                     for _ in range(args.repeats)]  # fmt: skip
            direct, task = (statistics.median(pair[side][0] for pair in pairs) for side in (0, 1))
            direct_rest, task_rest = (statistics.median(pair[side][1] for pair in pairs) for side in (0, 1))
            results[backend] = {
                "direct_s": direct,
                "task_s": task,
                "ratio": round(task / direct, 3),
                "ratio_after_first_call": round(task_rest / direct_rest, 3),
            }
            print(f"{backend}: pairs ((direct loop, after first call), (task ...)) {pairs}", flush=True)
            print(f"{backend}: ratio task/direct {task / direct:.3f}, after the first call "
                  f"{task_rest / direct_rest:.3f}", flush=True)  # fmt: skip
        print(json.dumps(results))
    finally:
        cluster.stop()
        hosts.stop()


if __name__ == "__main__":
    main()
