"""The Kubernetes launcher's costs, measured against the fake cluster (tests/fake_kubernetes; needs root
for the pods' network namespaces) and against the direct alternatives on the same machine.

Not part of the test suite. Prints:
- API requests per wait interval with 8/64/256 replicas, and the ratio to one request per pod per
  interval (what polling each pod, as one KubernetesPodOperator per replica does, would cost);
- the time to render every object of a 1,024-replica run;
- launch-to-running (submit until every replica's first line) on the fake cluster, and its ratio to
  the local launcher's for the same job;
- DAG-parse cost: a DAG file with a Kubernetes-launched training task against the same DAG with a bare
  KubernetesPodOperator, in fresh interpreters (median of N), and their ratio.
Run: .venv/bin/python benchmarks/kubernetes_launch.py [--replicas 8,64,256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from fake_kubernetes import FakeCluster  # noqa: E402

from airflow_provider_dnntrain.backends.base import wait_for_job  # noqa: E402
from airflow_provider_dnntrain.launchers import KubernetesLauncher, LocalLauncher  # noqa: E402
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TrainingJob  # noqa: E402

TEST_SCRIPTS = REPO / "tests" / "scripts"
WINDOW_SECONDS = 5.0

OURS_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow_provider_dnntrain.launchers import KubernetesLauncher
from airflow_provider_dnntrain.operators import PyTorchTrainOperator
from airflow_provider_dnntrain.spec import TorchDistributed
with DAG("parse_ours", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    PyTorchTrainOperator(task_id="train", source_directory={scripts!r}, entry_script="ranks.py",
                         distribution=TorchDistributed(node_count=2), launcher=KubernetesLauncher())
"""
KPO_DAG = """
import pendulum
from airflow.sdk import DAG
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
with DAG("parse_kpo", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    KubernetesPodOperator(task_id="train", image="dnntrain-torch:cpu", cmds=["python", "ranks.py"])
"""


def wide_job(replicas: int, sleep: float) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--sleep", str(sleep)],
        distribution=MultiWorkerMirrored(worker_count=replicas),
    )


def requests_per_interval(cluster: FakeCluster, replicas: int, work: Path) -> None:
    launcher = KubernetesLauncher(
        kubernetes_conn_id=None, config_file=str(cluster.kubeconfig), namespace="training",
        work_root=str(work), poll_interval=1.0, startup_timeout_seconds=600,
    )  # fmt: skip
    job = wide_job(replicas, sleep=WINDOW_SECONDS + 600)
    submitting = time.monotonic()
    handle = launcher.submit(job, launcher.plan(job, f"bench-wide-{replicas}"), extra_env={})
    submitted = time.monotonic() - submitting
    lines: list = []
    waiting = threading.Thread(target=lambda: _wait(launcher, handle, lines), daemon=True)
    waiting.start()
    started = time.monotonic()
    while sum(" ready" in line.text for line in list(lines)) < replicas:
        time.sleep(0.2)
    ready = time.monotonic() - started
    before, began = cluster.requests(), time.monotonic()
    time.sleep(WINDOW_SECONDS)
    after, ended = cluster.requests(), time.monotonic()
    launcher.cancel(handle)
    waiting.join(120)
    made = sum(after.values()) - sum(before.values())
    intervals = (ended - began) / launcher.poll_interval
    per_interval = made / intervals
    print(
        f"{replicas:4d} replicas: {per_interval:.2f} API requests per wait interval "
        f"(ratio to one per pod: {per_interval / replicas:.4f}); submit {submitted:.1f} s, then all "
        f"replicas' first lines {ready:.1f} s later"
    )


def _wait(launcher, handle, lines: list) -> None:
    with contextlib.suppress(Exception):  # cancelled: expected
        wait_for_job(launcher, handle, lines.append, timeout=3600)


def render_time(replicas: int, work: Path) -> None:
    launcher = KubernetesLauncher(namespace="training", work_root=str(work))
    job = wide_job(replicas, sleep=0)
    began = time.perf_counter()
    objects = launcher.preview_objects(job, "bench-render")
    elapsed = time.perf_counter() - began
    print(
        f"render {replicas} replicas: {elapsed:.2f} s for {len(objects)} objects (plan, bundle and manifests)"
    )


def launch_to_running(cluster: FakeCluster, work: Path, repeats: int) -> None:
    kubernetes = KubernetesLauncher(
        kubernetes_conn_id=None, config_file=str(cluster.kubeconfig), namespace="training",
        work_root=str(work), poll_interval=0.2,
    )  # fmt: skip
    local = LocalLauncher(work_root=str(work))
    timings: dict[str, list[float]] = {"kubernetes": [], "local": []}
    for attempt in range(repeats):
        for name, launcher in (("kubernetes", kubernetes), ("local", local)):
            job = wide_job(4, sleep=0)
            began = time.monotonic()
            handle = launcher.submit(job, launcher.plan(job, f"bench-launch-{name}-{attempt}"), extra_env={})
            lines: list = []
            first_line: dict[str, float] = {}

            def seen(line, first_line=first_line, lines=lines) -> None:
                lines.append(line)
                first_line.setdefault(line.replica, time.monotonic())

            wait_for_job(launcher, handle, seen, timeout=300)
            timings[name].append(max(first_line.values()) - began)
    k8s, direct = statistics.median(timings["kubernetes"]), statistics.median(timings["local"])
    print(
        f"launch to every replica's first line, 4 replicas: kubernetes (fake cluster) {k8s:.2f} s, "
        f"local launcher {direct:.2f} s, ratio {k8s / direct:.2f}"
    )


def parse_cost(repeats: int, work: Path) -> None:
    ours, kpo = work / "parse_ours.py", work / "parse_kpo.py"
    ours.write_text(OURS_DAG.format(scripts=str(TEST_SCRIPTS)))
    kpo.write_text(KPO_DAG)
    timings: dict[Path, list[float]] = {ours: [], kpo: []}
    for _ in range(repeats):
        for path in (ours, kpo):
            began = time.perf_counter()
            subprocess.run([sys.executable, str(path)], check=True, capture_output=True)
            timings[path].append(time.perf_counter() - began)
    mine, theirs = statistics.median(timings[ours]), statistics.median(timings[kpo])
    print(f"DAG parse (fresh interpreter): ours {mine:.2f} s, bare KubernetesPodOperator {theirs:.2f} s, "
          f"ratio {mine / theirs:.2f}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--replicas", default="8,64,256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dnntrain-bench-k8s-"))
    try:
        parse_cost(args.repeats, work)
        render_time(1024, work)
        with FakeCluster(work / "cluster") as cluster:
            launch_to_running(cluster, work, args.repeats)
            for replicas in (int(n) for n in args.replicas.split(",")):
                requests_per_interval(cluster, replicas, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
