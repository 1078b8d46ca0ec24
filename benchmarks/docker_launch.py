"""The Docker launcher against the same job started by hand with ``docker run``, on a real daemon
(tests/docker_daemon.py, with the test images ``make images-test`` built; needs root), and an
environment image's first build against its reuse.

Not part of the test suite. Prints, for torchrun 2 nodes x 1 process (digits, 1 epoch) in the training
image: the median wall time of N runs each way (alternating) and their ratio. By hand is what one would
type: a network, ``docker run -d`` per node with the source mounted and torchrun's arguments, ``docker
wait``, ``docker rm``. Then, for an environment with one extra package: the first build (and push to a
local registry) against a later run's reuse of it.
Run: .venv/bin/python benchmarks/docker_launch.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from docker_daemon import TORCH_IMAGE, DockerDaemon  # noqa: E402
from docker_registry import LocalRegistry  # noqa: E402

from airflow_provider_dnntrain.backends.base import wait_for_job  # noqa: E402
from airflow_provider_dnntrain.backends.common import environment_images as images  # noqa: E402
from airflow_provider_dnntrain.launchers import DockerLauncher  # noqa: E402
from airflow_provider_dnntrain.spec import Environment, TorchDistributed, TrainingJob  # noqa: E402

EXAMPLE_SCRIPTS = REPO / "dags" / "scripts"


def ddp_job() -> TrainingJob:
    return TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "1"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )


def by_hand(daemon: DockerDaemon, name: str) -> float:
    """torchrun in two containers on a network of their own, the source mounted, as typed by hand."""
    started = time.perf_counter()
    daemon.docker("network", "create", name)
    containers = []
    for rank in range(2):
        torchrun = ["torchrun", "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank),
                    "--master-addr", f"{name}-0", "--master-port", "29500",
                    "torch_ddp_digits.py", "--epochs", "1"]  # fmt: skip
        run = ["run", "-d", "--init", "--network", name, "--name", f"{name}-{rank}", "--hostname",
               f"{name}-{rank}", "-v", f"{EXAMPLE_SCRIPTS}:/src:ro", "-w", "/tmp", "-e", "PYTHONPATH=/src",
               "-e", "PYTHONUNBUFFERED=1", TORCH_IMAGE, "sh", "-c", 'cp /src/*.py . && exec "$@"', "sh",
               *torchrun]  # fmt: skip
        containers.append(daemon.docker(*run).stdout.strip())
    codes = daemon.docker("wait", *containers).stdout.split()
    if codes != ["0", "0"]:
        logs = [daemon.docker("logs", c, check=False).stderr[-2000:] for c in containers]
        raise RuntimeError(f"by hand: exit codes {codes}\n" + "\n".join(logs))
    daemon.docker("rm", "-f", *containers)
    daemon.docker("network", "rm", name)
    return time.perf_counter() - started


def with_launcher(launcher: DockerLauncher, job: TrainingJob, run_id: str) -> float:
    started = time.perf_counter()
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    wait_for_job(launcher, handle, lambda line: None, timeout=600)
    launcher.collect_outputs(handle)
    return time.perf_counter() - started


def environment_builds(daemon: DockerDaemon) -> tuple[float, float]:
    """(first build and push of a new environment, a later run's finding it), in seconds."""
    with LocalRegistry() as registry:
        os.environ["AIRFLOW_CONN_BENCH_REGISTRY"] = (
            f"docker://{registry.username}:{registry.password}@{registry.address}"
        )
        job = TrainingJob(
            framework="pytorch", source_directory=str(EXAMPLE_SCRIPTS), entry_script="digits.py",
            environment=Environment(pip_packages=["pyjokes==0.8.3"]),
        )  # fmt: skip
        building = images.ImageBuilding(daemon.base_url, docker_conn_id="bench_registry")
        tag = building.tag(job, TORCH_IMAGE, "python")
        key = tag.rsplit(":", 1)[1]  # every tag of it (earlier registries' too), and its layers: no cache
        found = daemon.docker("images", "-q", "--filter", f"label={images.KEY_LABEL}={key}").stdout.split()
        for image in set(found):
            daemon.docker("rmi", "-f", image, check=False)
        registry.delete(tag)
        started = time.perf_counter()
        assert building.ensure(job, TORCH_IMAGE, "python").built
        first = time.perf_counter() - started
        started = time.perf_counter()
        assert not building.ensure(job, TORCH_IMAGE, "python").built
        return first, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="dnntrain-bench-"))
    with tempfile.TemporaryDirectory() as root, DockerDaemon() as daemon:
        launcher = DockerLauncher(docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=root)
        direct, launched = [], []
        for repeat in range(args.repeats):
            order = ("direct", "launcher") if repeat % 2 == 0 else ("launcher", "direct")
            for side in order:
                if side == "direct":
                    direct.append(by_hand(daemon, f"bench-hand-{repeat}"))
                else:
                    launched.append(with_launcher(launcher, ddp_job(), f"bench-ddp-{repeat}"))
        ratio = statistics.median(launched) / statistics.median(direct)
        print(
            f"torchrun 2 containers x 1, {args.repeats} alternating runs: by hand (docker run) median "
            f"{statistics.median(direct):.2f} s, Docker launcher {statistics.median(launched):.2f} s, "
            f"ratio {ratio:.2f}"
        )
        first, cached = environment_builds(daemon)
        print(
            f"environment image (+1 package on the training image): first build and push {first:.1f} s, "
            f"found again {cached:.2f} s, ratio {first / cached:.0f}"
        )


if __name__ == "__main__":
    main()
