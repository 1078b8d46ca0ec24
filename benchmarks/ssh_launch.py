"""The SSH launcher against the same job started by hand over ssh, on three sshd hosts on this machine
(tests/ssh_hosts.py; needs root for the network namespaces).

Not part of the test suite. Prints, for torchrun 2 nodes x 1 process (digits, 1 epoch): the median wall
time of N runs each way (alternating) and their ratio; for 3 hosts: the time from submit to every
replica's first line; and the lines per second delivered into the log from 3 chatty replicas.
Run: .venv/bin/python benchmarks/ssh_launch.py [--repeats 5] [--lines 100000]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from ssh_hosts import SSHHosts  # noqa: E402

from airflow_provider_dnntrain.backends.base import wait_for_job  # noqa: E402
from airflow_provider_dnntrain.launchers import SSHLauncher  # noqa: E402
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TorchDistributed, TrainingJob  # noqa: E402

EXAMPLE_SCRIPTS = REPO / "dags" / "scripts"
TEST_SCRIPTS = REPO / "tests" / "scripts"


def ddp_job() -> TrainingJob:
    return TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "1"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )


def chatty_job(lines: int, replicas: int) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--print-env", "DNNTRAIN_ROLE", "--lines", str(lines)],  # a first line at once
        distribution=MultiWorkerMirrored(worker_count=replicas),
    )


def by_hand(hosts: SSHHosts, port: int) -> float:
    """torchrun on each of two hosts over plain ssh, the way one would without Airflow."""
    ssh = ["ssh", "-i", str(hosts.client_key), "-o", f"UserKnownHostsFile={hosts.known_hosts}"]
    ssh += ["-o", "BatchMode=yes", "-l", hosts.user]
    master = hosts.hosts[0].address
    started = time.perf_counter()
    processes = []
    for rank, host in enumerate(hosts.hosts[:2]):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
        torchrun += ["--node-rank", str(rank), "--master-addr", master, "--master-port", str(port)]
        torchrun += ["torch_ddp_digits.py", "--epochs", "1"]
        remote = f"cd {shlex.quote(str(EXAMPLE_SCRIPTS))} && {shlex.join(torchrun)}"
        command = [*ssh, "-p", str(host.port), "127.0.0.1", remote]
        processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    codes = [p.wait() for p in processes]
    assert codes == [0, 0], codes
    return time.perf_counter() - started


def with_launcher(launcher: SSHLauncher, job: TrainingJob, run_id: str) -> tuple[float, float, int]:
    """(wall time from submit to outputs collected, seconds until every replica's first line, lines)."""
    started = time.perf_counter()
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    first_line: dict[str, float] = {}
    count = 0

    def on_log(line) -> None:
        nonlocal count
        count += 1
        first_line.setdefault(line.replica.split("/")[0], time.perf_counter() - started)

    wait_for_job(launcher, handle, on_log, timeout=600)
    launcher.collect_outputs(handle)
    return time.perf_counter() - started, max(first_line.values()), count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--lines", type=int, default=100_000)
    args = parser.parse_args()
    os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="dnntrain-bench-"))
    with tempfile.TemporaryDirectory() as root, SSHHosts(Path(root) / "hosts") as hosts:
        for index, host in enumerate(hosts.hosts):
            os.environ[f"AIRFLOW_CONN_BENCH_H{index}"] = hosts.airflow_connection(host)
        launcher = SSHLauncher(ssh_conn_ids=["bench_h0", "bench_h1", "bench_h2"], work_root=root)
        direct, launched = [], []
        for repeat in range(args.repeats):
            order = ("direct", "launcher") if repeat % 2 == 0 else ("launcher", "direct")
            for side in order:
                if side == "direct":
                    direct.append(by_hand(hosts, 29500 + repeat))
                else:
                    launched.append(with_launcher(launcher, ddp_job(), f"bench-ddp-{repeat}")[0])
        ratio = statistics.median(launched) / statistics.median(direct)
        print(
            f"torchrun 2 hosts x 1, {args.repeats} alternating runs: by hand over ssh median "
            f"{statistics.median(direct):.2f} s, SSH launcher {statistics.median(launched):.2f} s, "
            f"ratio {ratio:.2f}"
        )
        to_first_line, rates = [], []
        for repeat in range(args.repeats):
            wall, first, count = with_launcher(launcher, chatty_job(0, 3), f"bench-start-{repeat}")
            to_first_line.append(first)
            wall, first, count = with_launcher(launcher, chatty_job(args.lines, 3), f"bench-lines-{repeat}")
            rates.append(count / wall)
        print(
            f"3 hosts: submit to every replica's first line, median {statistics.median(to_first_line):.2f} s "
            f"(of {json.dumps([round(t, 2) for t in to_first_line])})"
        )
        print(
            f"3 replicas x {args.lines} lines: median {statistics.median(rates):,.0f} lines/s delivered "
            "into the log (whole run, submit to outputs collected)"
        )


if __name__ == "__main__":
    main()
