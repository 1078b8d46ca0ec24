"""A stand-in Horovod rank (tests only): knows its rank from the launcher's environment."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from published import publish

RANK = int(os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK", "-1")))


def wait_for_every_rank() -> None:
    size = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("HOROVOD_SIZE", "1")))
    deadline = time.monotonic() + 60
    while len(list(Path("outputs").glob("rank-*.pid"))) < size and time.monotonic() < deadline:
        time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", default=None, help="RANK:CODE exits with CODE")
    parser.add_argument("--hang", action="store_true")
    args = parser.parse_args()
    Path("outputs").mkdir(exist_ok=True)
    publish(Path("outputs") / f"rank-{RANK}.pid", str(os.getpid()))
    print(
        f"rank {RANK} of {os.environ.get('OMPI_COMM_WORLD_SIZE', os.environ.get('HOROVOD_SIZE'))} up",
        flush=True,
    )
    if args.fail and int(args.fail.split(":")[0]) == RANK:
        wait_for_every_rank()  # so the test can check that none outlives the failure
        print(f"rank {RANK} failing", flush=True)
        sys.exit(int(args.fail.split(":")[1]))
    while args.hang or args.fail:
        time.sleep(1)


if __name__ == "__main__":
    main()
