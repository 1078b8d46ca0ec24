"""A stand-in training script whose behaviour per replica is chosen by flags (tests only)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from published import publish

NAME = f"{os.environ.get('DNNTRAIN_ROLE', 'worker')}-{os.environ.get('DNNTRAIN_REPLICA_INDEX', '0')}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--fail", action="append", default=[], help="NAME:CODE exits with CODE")
    parser.add_argument("--serve", action="append", default=[], help="NAME runs until stopped")
    parser.add_argument("--lines", type=int, default=0, help="print this many numbered lines")
    parser.add_argument("--partial", action="store_true", help="end with a line lacking its newline")
    parser.add_argument("--spawn", action="store_true", help="start a child and a setsid'd child, then serve")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--graceful", default=None, help="NAME:SECONDS takes that long to exit on SIGTERM")
    parser.add_argument("--bind", action="store_true", help="listen on this replica's TF_CONFIG port")
    parser.add_argument("--print-env", action="append", default=[], help="print this variable's value")
    parser.add_argument("--progress", type=int, default=0, help="show a tqdm bar of this many steps")
    parser.add_argument("--long-line", type=int, default=0, help="write this many bytes without a newline")
    parser.add_argument("--sleep", type=float, default=0.0)
    parser.add_argument("--until", default=None, help="end the --sleep early once this file exists")
    args, _unknown = parser.parse_known_args()

    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    graceful = args.graceful and args.graceful.split(":")[0] == NAME
    if graceful:
        seconds = float(args.graceful.split(":")[1])
        signal.signal(signal.SIGTERM, lambda *_: shut_down_gracefully(seconds))
    outputs = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"))
    outputs.mkdir(exist_ok=True)
    (outputs / "argv.json").write_text(json.dumps(sys.argv[1:]))
    (outputs / "env.json").write_text(json.dumps(dict(os.environ)))
    (outputs / "who.txt").write_text(NAME)
    if Path("scratch.txt").exists():
        with open("scratch.txt", "r+") as scratch:  # in place: must not reach other replicas
            scratch.write(NAME)
    (Path("logs") / "note.txt").write_text(f"log of {NAME}")
    listener = bind_own_port() if args.bind else None

    for name in args.print_env:
        print(f"{NAME} {name}={os.environ.get(name)}", flush=True)
    for i in range(args.lines):
        sys.stdout.write(f"{NAME} line {i} " + "x" * (i % 50) + "\n")
    if args.progress:
        show_progress(args.progress)
    if args.long_line:
        write_long_line(args.long_line)
    if args.spawn:
        spawn_children(outputs)
    print(f"{NAME} ready", flush=True)
    sleep_until(args.sleep, args.until)
    for spec in args.fail:
        name, code = spec.split(":")
        if name == NAME:
            print(f"{NAME} about to fail", flush=True)
            sys.exit(int(code))
    if NAME in args.serve or args.spawn or args.ignore_term or graceful:
        while True:
            time.sleep(1)
    if args.partial:
        sys.stdout.write(f"{NAME} partial-end")
        sys.stdout.flush()
    del listener


def bind_own_port() -> socket.socket:
    config = json.loads(os.environ["TF_CONFIG"])
    address = config["cluster"][config["task"]["type"]][config["task"]["index"]]
    host, port = address.rsplit(":", 1)
    listener = socket.socket()
    listener.bind((host, int(port)))  # fails with EADDRINUSE if the planned port was taken
    listener.listen()
    print(f"{NAME} listening on {address}", flush=True)
    return listener


def shut_down_gracefully(seconds: float) -> None:
    print(f"{NAME} got SIGTERM, saving for {seconds}s", flush=True)
    time.sleep(seconds)
    Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"), "graceful.txt").write_text("saved")
    sys.exit(0)


def show_progress(steps: int) -> None:
    from tqdm import tqdm

    for _ in tqdm(range(steps), desc=f"{NAME} epoch", file=sys.stdout, mininterval=0, ascii=True):
        time.sleep(0.002)


def write_long_line(size: int) -> None:
    block = "y" * 4096
    for _ in range(size // len(block)):
        sys.stdout.write(block)
    sys.stdout.write("y" * (size % len(block)) + "\n")
    sys.stdout.flush()


def spawn_children(outputs: Path) -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    child = subprocess.Popen(sleeper)
    escaped = subprocess.Popen(sleeper, start_new_session=True)
    pids = {"child": child.pid, "escaped": escaped.pid, "self": os.getpid()}
    publish(outputs / "pids.json", json.dumps(pids))


def sleep_until(seconds: float, path: str | None) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (path and os.path.exists(path)):
        time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))


if __name__ == "__main__":
    main()
