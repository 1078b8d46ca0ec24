"""Runs first in every pod of a run (mounted from the run's ConfigMap; standard library only).

``run -- argv...``: unpack the source into the working directory, write the replica's files, put
the replica site (in the bundle) first on ``PYTHONPATH``, wait (bounded) until every
``--ssh-peer`` answers SSH, then become the replica's command. ``sshd``: unpack likewise (ranks
started over SSH run in the same folder), then become an SSH daemon with the run's keys. ``hold``:
sleep until stopped (keeps the chief's working directory readable after its script ends).
``pack``: the outputs and logs folders as a base64 tar on stdout.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time

BUNDLE = os.path.dirname(os.path.abspath(__file__))
SSH_DIR = "/dnntrain/ssh"
PEER_WAIT_SECONDS = 600


def unpack() -> None:
    workdir = os.getcwd()
    with tarfile.open(os.path.join(BUNDLE, "source.tar.gz")) as tar:
        tar.extractall(workdir, filter="data")
    for folder in ("outputs", "logs"):  # every launcher gives the script both
        os.makedirs(os.path.join(workdir, folder), exist_ok=True)
    replica = os.environ.get("DNNTRAIN_POD_REPLICA", "")
    with open(os.path.join(BUNDLE, "files.json")) as listing:
        files = json.load(listing).get(replica, {})
    for name, text in files.items():
        with open(os.path.join(workdir, name), "w") as handle:
            handle.write(text)
    # The bundle holds the replica site's sitecustomize.py: first on the path, in every pod alike.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (BUNDLE, os.environ.get("PYTHONPATH")) if p)


def ssh_client_config(peers: list[str]) -> None:
    """How the runner reaches the other nodes: the run's key, their shared host key, their port."""
    home = os.path.join(os.getcwd(), ".dnntrain", "home")
    os.makedirs(os.path.join(home, ".ssh"), mode=0o700, exist_ok=True)
    port = os.environ.get("DNNTRAIN_SSH_PORT", "2222")
    domains = sorted({peer.split(".", 1)[1] for peer in peers if "." in peer})
    patterns = " ".join([*peers, *(f"*.{d}" for d in domains)])
    with open(os.path.join(home, ".ssh", "config"), "w") as handle:
        handle.write(
            f"Host {patterns}\n  Port {port}\n  IdentityFile {SSH_DIR}/id\n"
            f"  UserKnownHostsFile {SSH_DIR}/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
    os.environ["HOME"] = home


def wait_for_peers(peers: list[str]) -> None:
    """The runner starts only once every node's sshd completes a login: no retry storm of its own."""
    deadline = time.monotonic() + PEER_WAIT_SECONDS
    waiting = list(peers)
    while waiting:
        waiting = [peer for peer in waiting if not _answers(peer)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            sys.exit(f"dnntrain: SSH on {', '.join(waiting)} never answered")
        time.sleep(0.5)


def _answers(peer: str) -> bool:
    try:
        socket.getaddrinfo(peer, None)
    except OSError:
        return False
    probe = ["ssh", "-o", "ConnectTimeout=5", peer, "true"]
    return subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0


def run(argv: list[str], peers: list[str]) -> None:
    unpack()
    if peers:
        ssh_client_config(peers)
        wait_for_peers(peers)
    sys.stdout.flush()
    os.execvp(argv[0], argv)


def sshd(port: int) -> None:
    unpack()
    config = os.path.join(os.getcwd(), ".dnntrain", "sshd_config")
    with open(config, "w") as handle:
        handle.write(
            f"Port {port}\nHostKey {SSH_DIR}/host_key\nAuthorizedKeysFile {SSH_DIR}/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PermitRootLogin prohibit-password\nPermitUserEnvironment no\nPidFile {config}.pid\n"
        )
    os.makedirs("/run/sshd", exist_ok=True)
    daemon = "/usr/sbin/sshd"
    os.execv(daemon, [daemon, "-D", "-e", "-f", config])


def hold() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    while True:
        time.sleep(3600)


def pack(folders: list[str]) -> None:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for folder in folders:
            if os.path.isdir(folder):
                tar.add(folder)
    sys.stdout.write(base64.b64encode(buffer.getvalue()).decode())


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--ssh-peer", action="append", default=[])
    run_parser.add_argument("argv", nargs=argparse.REMAINDER)
    sshd_parser = commands.add_parser("sshd")
    sshd_parser.add_argument("--port", type=int, default=2222)
    commands.add_parser("hold")
    pack_parser = commands.add_parser("pack")
    pack_parser.add_argument("folders", nargs="*", default=["outputs", "logs"])
    args = parser.parse_args()
    if args.command == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        run(argv, args.ssh_peer)
    elif args.command == "sshd":
        sshd(args.port)
    elif args.command == "hold":
        hold()
    else:
        pack(args.folders)


if __name__ == "__main__":
    main()
