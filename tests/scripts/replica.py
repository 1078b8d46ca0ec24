"""A stand-in training script whose behaviour per replica is chosen by flags (tests only)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

NAME = f"{os.environ.get('DNNTRAIN_ROLE', 'worker')}-{os.environ.get('DNNTRAIN_REPLICA_INDEX', '0')}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", action="append", default=[], help="NAME:CODE exits with CODE")
    parser.add_argument("--serve", action="append", default=[], help="NAME runs until stopped")
    parser.add_argument("--lines", type=int, default=0, help="print this many numbered lines")
    parser.add_argument("--partial", action="store_true", help="end with a line lacking its newline")
    parser.add_argument("--spawn", action="store_true", help="start a child and a setsid'd child, then serve")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--sleep", type=float, default=0.0)
    args, _unknown = parser.parse_known_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    outputs = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"))
    outputs.mkdir(exist_ok=True)
    (outputs / "argv.json").write_text(json.dumps(sys.argv[1:]))
    (outputs / "env.json").write_text(json.dumps(dict(os.environ)))
    (outputs / "who.txt").write_text(NAME)
    if Path("scratch.txt").exists():
        with open("scratch.txt", "r+") as scratch:  # in place: must not reach other replicas
            scratch.write(NAME)
    (Path("logs") / "note.txt").write_text(f"log of {NAME}")

    for i in range(args.lines):
        sys.stdout.write(f"{NAME} line {i} " + "x" * (i % 50) + "\n")
    if args.spawn:
        spawn_children(outputs)
    print(f"{NAME} ready", flush=True)
    time.sleep(args.sleep)
    for spec in args.fail:
        name, code = spec.split(":")
        if name == NAME:
            print(f"{NAME} about to fail", flush=True)
            sys.exit(int(code))
    if NAME in args.serve or args.spawn or args.ignore_term:
        while True:
            time.sleep(1)
    if args.partial:
        sys.stdout.write(f"{NAME} partial-end")
        sys.stdout.flush()


def spawn_children(outputs: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper)
    escaped = subprocess.Popen(sleeper, start_new_session=True)
    pids = {"child": child.pid, "escaped": escaped.pid, "self": os.getpid()}
    (outputs / "pids.json").write_text(json.dumps(pids))


if __name__ == "__main__":
    main()
