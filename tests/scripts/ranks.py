"""A stand-in rank for the multi-process runners (tests only): torchrun, horovodrun, mpirun.

Writes what it received per rank, optionally logs metrics on every rank (as Azure ML samples do),
starts a child process, sleeps, or fails.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from published import publish

RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "HOROVOD_RANK", "RANK")
REPLICA = f"{os.environ.get('DNNTRAIN_ROLE', 'worker')}-{os.environ.get('DNNTRAIN_REPLICA_INDEX', '0')}"
RANK = next((os.environ[name] for name in RANK_VARIABLES if name in os.environ), REPLICA)
# rank N (or replica index N, for replicas without ranks) logs N*1000 + step: whose numbers are whose
NUMBER = int(RANK) if RANK.isdigit() else int(os.environ.get("DNNTRAIN_REPLICA_INDEX", "0"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log-metrics", type=int, default=0, help="log 'loss' for this many steps")
    parser.add_argument("--late", action="store_true", help="log the metrics after the sleep, not before")
    parser.add_argument("--spawn", action="store_true", help="start a child that sleeps")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--until", help="...but no longer than until this file is in the working directory")
    parser.add_argument("--ticks", type=int, default=0, help="then print this many numbered lines...")
    parser.add_argument("--tick-seconds", type=float, default=0.5, help="...this far apart")
    parser.add_argument("--ignore-term", action="store_true", help="ignore SIGTERM, as TensorFlow does")
    parser.add_argument("--print-env", action="append", default=[])
    parser.add_argument("--print-argv", action="store_true", help="print the arguments as JSON")
    parser.add_argument("--write-env", action="append", default=[], help="write this variable to a file")
    parser.add_argument("--write-mb", type=int, default=0, help="write this many MiB of random outputs")
    parser.add_argument("--allocate-mb", type=int, default=0, help="hold this many MiB of memory")
    args, _unknown = parser.parse_known_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outputs = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"))
    outputs.mkdir(exist_ok=True)
    (outputs / f"argv-{RANK}.json").write_text(json.dumps(sys.argv[1:]))
    pids = {"self": os.getpid()}
    if args.spawn:
        pids["child"] = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"]).pid
    publish(outputs / f"pids-{RANK}.json", json.dumps(pids))
    for name in args.print_env:
        print(f"rank {RANK} {name}={os.environ.get(name)}", flush=True)
    if args.print_argv:
        print(f"rank {RANK} argv={json.dumps(sys.argv[1:])}", flush=True)
    for name in args.write_env:
        (outputs / f"env-{RANK}-{name}.txt").write_text(os.environ.get(name, ""))
    if args.write_mb:
        write_random(outputs / "model", args.write_mb)
    held = bytearray(args.allocate_mb << 20)
    for page in range(0, len(held), 4096):  # touched, so that it is really used
        held[page] = 1
    if args.log_metrics and not args.late:
        log_metrics(args.log_metrics)
    print(f"rank {RANK} ready", flush=True)
    sleep(args.sleep, args.until)
    for tick in range(args.ticks):
        print(f"rank {RANK} tick {tick} of {args.ticks}", flush=True)
        time.sleep(args.tick_seconds)
    if args.log_metrics and args.late:
        log_metrics(args.log_metrics)


def write_random(folder: Path, mebibytes: int) -> None:
    """``mebibytes`` of random files (16 MiB each, written a MiB at a time) and their SHA-256s."""
    import hashlib

    folder.mkdir(exist_ok=True)
    digests = {}
    for number in range(0, mebibytes, 16):
        path, digest = folder / f"part-{number // 16}.bin", hashlib.sha256()
        with open(path, "wb") as part:
            for _ in range(min(16, mebibytes - number)):
                block = os.urandom(1 << 20)
                digest.update(block)
                part.write(block)
        digests[path.name] = digest.hexdigest()
    (folder.parent / "digests.json").write_text(json.dumps(digests))


def sleep(seconds: float, until: str | None) -> None:
    """``seconds``, or less once ``until`` exists (a test's go-ahead)."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0 and not (until and Path(until).exists()):
        time.sleep(min(left, 0.2) if until else left)


def log_metrics(steps: int) -> None:
    import mlflow

    for step in range(steps):
        mlflow.log_metric("loss", 1000.0 * NUMBER + step, step=step)
    (Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs")) / f"run-{RANK}.txt").write_text(
        mlflow.active_run().info.run_id
    )
    mlflow.end_run()


if __name__ == "__main__":
    main()
