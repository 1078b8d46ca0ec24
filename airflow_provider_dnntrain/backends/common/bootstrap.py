"""Runs first in every pod or container of a run (mounted from a Kubernetes run's ConfigMap, put into a
Docker run's containers; standard library only). "Pod" below is either.

``run -- argv...``: unpack the source into the working directory, write the replica's files, put
the replica site (in the bundle) first on ``PYTHONPATH``, wait (bounded) until every
``--ssh-peer`` answers SSH, then become the replica's command. ``sshd``: unpack likewise (ranks
started over SSH run in the same folder), then become an SSH daemon with the run's keys. ``hold``:
sleep until stopped (keeps the chief's working directory readable after its script ends; with
``--rank-logs DIR``, an MPIJob's worker, it prints the lines of the ranks started in this pod meanwhile).
``unpack``: unpack the source and the replica's files, and end (an MPIJob worker's init container).
``run --replica-of-pod``: the replica is the plan's whose host is this pod (``DNNTRAIN_POD_NAME``), run
with its argv and its variables besides those already set (a pod of a Kubeflow job: one template serves
every replica of a type, and the training operator's variables are the pod's own).
With ``--rank-logs DIR``, ``run`` and ``sshd`` stay as the parent of the command and print the lines
that ranks started in this pod write to per-rank files, as ``[rank.N] line``.
``pack``: the outputs and logs folders as a tar stream on stdout, ended by their manifest (``MANIFEST``).
With ``--orphan-timeout SECONDS``, ``run``, ``sshd`` and ``hold`` watch the run's lease (a file of the
run's ConfigMap, which kubelet keeps current and whoever watches the run renews): once it has not
changed for that long, the task and its trigger are gone, and the pod ends its processes by itself.
Unpacking also fetches the job's downloaded inputs (``input-sources/inputs.json``, from the run's
Secret) into the inputs cache volume, once per cache, and links ``inputs/<name>`` to them.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time

# Python 3.11.4+ checks what a tar extracts; an older one (Debian 12 has 3.11.2) unpacks our own archive
# as it is.
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

BUNDLE = os.path.dirname(os.path.abspath(__file__))
SSH_DIR = "/dnntrain/ssh"
SSH = "/usr/bin/ssh"
INPUT_SOURCES = "/dnntrain/input-sources/inputs.json"
INPUTS_CACHE = "/dnntrain/inputs-cache"
FETCH_TIMEOUT_SECONDS = 300  # without a byte
PEER_WAIT_SECONDS = 600
LEASE_FILE = os.path.join(BUNDLE, "lease")
LEASE_CHECK_SECONDS = 5.0
KILL_GRACE_SECONDS = 10.0
MANIFEST = ".dnntrain-manifest.json"  # the last member of what ``pack`` sends: {path: [size, sha256]}


def unpack() -> None:
    workdir = os.getcwd()
    with tarfile.open(os.path.join(BUNDLE, "source.tar.gz")) as tar:
        tar.extractall(workdir, **SAFE_EXTRACT)
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
    fetch_inputs(workdir)


def fetch_inputs(workdir: str) -> None:
    if not os.path.exists(INPUT_SOURCES):
        return
    import host_cache  # beside this file, in the bundle

    with open(INPUT_SOURCES) as listing:
        sources = json.load(listing)["inputs"]
    for source in sources:
        began = time.monotonic()
        try:
            fetched = host_cache.make_once(INPUTS_CACHE, source["key"], functools.partial(_download, source))
        except (OSError, ValueError) as error:
            sys.exit(f"dnntrain: inputs.{source['name']}: fetching failed: {error}")
        host_cache.link(
            os.path.join(INPUTS_CACHE, source["key"]), os.path.join(workdir, "inputs", source["name"])
        )
        how = f"fetched in {time.monotonic() - began:.2f} s" if fetched else "cached"
        print(f"dnntrain: input {source['name']}: {how}", flush=True)


def _download(source: dict, scratch: str) -> None:
    """Every file of the input, 8 at a time (an object store serves files in parallel)."""
    from concurrent.futures import ThreadPoolExecutor

    leaf = os.path.join(scratch, source["leaf"])
    with ThreadPoolExecutor(8) as pool:
        done = pool.map(
            lambda entry: _download_file(
                entry[1], os.path.join(leaf, entry[0]) if entry[0] else leaf, source["headers"]
            ),
            source["files"],
        )
        list(done)  # raises the first failure


def _download_file(url: str, target: str, headers: dict) -> None:
    import shutil
    import urllib.parse
    import urllib.request

    os.makedirs(os.path.dirname(target), exist_ok=True)
    shown = urllib.parse.urlsplit(url)._replace(query="").geturl()  # a signature is a credential
    try:
        request = urllib.request.Request(url, headers=headers)
        with (
            urllib.request.urlopen(request, timeout=FETCH_TIMEOUT_SECONDS) as response,
            open(target, "wb") as out,
        ):
            shutil.copyfileobj(response, out, 1 << 20)
    except OSError as error:
        raise OSError(f"{shown}: {error}") from None


def ssh_client_config(peers: list[str]) -> None:
    """How the runner reaches the other nodes: the run's key, their shared host key, their port. ssh
    reads ~/.ssh/config from the password database's home, not $HOME: so an ``ssh`` first on the PATH
    (for mpirun and horovodrun alike) names the run's configuration."""
    folder = os.path.join(os.getcwd(), ".dnntrain")
    os.makedirs(os.path.join(folder, "bin"), exist_ok=True)
    port = os.environ.get("DNNTRAIN_SSH_PORT", "2222")
    domains = sorted({peer.split(".", 1)[1] for peer in peers if "." in peer})
    # Open MPI may shorten host names to their first label: those are the peers too.
    patterns = " ".join([*peers, *(p.split(".", 1)[0] for p in peers), *(f"*.{d}" for d in domains)])
    config = os.path.join(folder, "ssh_config")
    with open(config, "w") as handle:
        handle.write(
            f"Host {patterns}\n  Port {port}\n  IdentityFile {SSH_DIR}/id\n  IdentitiesOnly yes\n"
            f"  UserKnownHostsFile {SSH_DIR}/known_hosts\n  StrictHostKeyChecking yes\n  BatchMode yes\n"
        )
    wrapper = os.path.join(folder, "bin", "ssh")
    with open(wrapper, "w") as handle:
        handle.write(f'#!/bin/sh\nexec {SSH} -F {config} "$@"\n')
    os.chmod(wrapper, 0o755)
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(wrapper), os.environ.get("PATH", "")])


def wait_for_peers(peers: list[str]) -> None:
    """The runner starts only once every node's sshd completes a login: no retry storm of its own."""
    print(f"dnntrain: waiting for SSH on {', '.join(peers)}", flush=True)
    deadline = time.monotonic() + PEER_WAIT_SECONDS
    waiting, errors = list(peers), {}
    while waiting:
        waiting = [peer for peer in waiting if not _answers(peer, errors)]
        if not waiting:
            return
        if time.monotonic() > deadline:
            sys.exit(f"dnntrain: SSH on {', '.join(waiting)} never answered: {errors}")
        time.sleep(0.5)


def _answers(peer: str, errors: dict[str, str]) -> bool:
    try:
        socket.getaddrinfo(peer, None)
    except OSError as error:
        errors[peer] = str(error)
        return False
    probe = ["ssh", "-o", "ConnectTimeout=5", peer, "true"]
    result = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    errors[peer] = result.stderr.strip()
    return result.returncode == 0


def replica_of_pod() -> list[str]:
    """Take on the plan's replica that runs in this pod: its variables (where the pod has none of its
    own) and its argv."""
    pod = os.environ["DNNTRAIN_POD_NAME"]
    with open(os.path.join(BUNDLE, "plan.json")) as listing:
        replicas = json.load(listing)["replicas"]
    replica = next((r for r in replicas if r["host"].split(".", 1)[0] == pod), None)
    if replica is None:
        sys.exit(f"dnntrain: no replica of the plan runs in pod {pod}")
    for name, value in replica["env"].items():
        os.environ.setdefault(name, value)
    os.environ["DNNTRAIN_POD_REPLICA"] = replica["name"]
    return replica["argv"]


def run(argv: list[str], peers: list[str], rank_logs: str | None, orphan_timeout: float | None) -> None:
    unpack()
    if peers:
        ssh_client_config(peers)
        wait_for_peers(peers)
    sys.stdout.flush()
    if rank_logs or orphan_timeout:
        supervise(argv, rank_logs, orphan_timeout)
    os.execvp(argv[0], argv)


def supervise(argv: list[str], rank_logs: str | None, orphan_timeout: float | None = None) -> None:
    """Run ``argv`` in a process group of its own, pass signals on to it, print the lines its ranks
    write to per-rank files (Open MPI's ``--output-filename``) as ``[rank.N] line`` - the pod's log is
    where they are read - and end it if the run's lease lapses. Exits as it does."""
    child = subprocess.Popen(argv, start_new_session=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda number, _: _signal_group(child.pid, number))
    watch_lease(orphan_timeout, lambda: _end_group(child))
    offsets: dict[str, int] = {}
    while True:
        ended = child.poll() is not None  # before reading: what was written before the exit is read
        if rank_logs:
            _print_rank_lines(rank_logs, offsets, final=ended)
        if ended:
            code = child.returncode
            sys.exit(128 - code if code < 0 else code)
        time.sleep(0.2)


def _signal_group(pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, number)


def _end_group(child: subprocess.Popen) -> None:
    _signal_group(child.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(KILL_GRACE_SECONDS)
    _signal_group(child.pid, signal.SIGKILL)


def watch_lease(timeout: float | None, on_lapse) -> None:
    """Call ``on_lapse`` (in a thread) once the run's lease has not changed for ``timeout`` seconds:
    nothing watches the run any more, and nothing else would ever stop this pod. Measured with this
    pod's own clock, from when it last saw the lease change: no clocks are compared."""
    if not timeout:
        return

    def watch() -> None:
        seen, since = _lease(), time.monotonic()
        while True:
            time.sleep(min(LEASE_CHECK_SECONDS, timeout / 4))
            now = _lease()
            if now != seen:
                seen, since = now, time.monotonic()
            elif time.monotonic() - since > timeout:
                print(
                    f"dnntrain: nobody has watched this run for {timeout:g} s (orphan_timeout): its task "
                    "is gone; ending this pod's processes",
                    flush=True,
                )
                on_lapse()
                return

    threading.Thread(target=watch, name="lease", daemon=True).start()


def _lease() -> str:
    try:
        with open(LEASE_FILE) as lease:
            return lease.read()
    except OSError:
        return ""


def _print_rank_lines(folder: str, offsets: dict[str, int], final: bool) -> None:
    for root, _, names in sorted(os.walk(folder)):
        rank = os.path.basename(root)
        for name in sorted(n for n in names if n in ("stdout", "stderr") and rank.startswith("rank.")):
            path = os.path.join(root, name)
            with open(path, "rb") as stream:
                stream.seek(offsets.get(path, 0))
                data = stream.read()
            whole = data if final else data[: data.rfind(b"\n") + 1]
            offsets[path] = offsets.get(path, 0) + len(whole)
            for line in whole.decode(errors="replace").splitlines():
                print(f"[{rank}] {line}", flush=True)


def sshd(port: int, rank_logs: str | None, orphan_timeout: float | None) -> None:
    unpack()
    os.makedirs(os.path.join(os.getcwd(), ".dnntrain"), exist_ok=True)
    config = os.path.join(os.getcwd(), ".dnntrain", "sshd_config")
    with open(config, "w") as handle:
        handle.write(
            f"Port {port}\nHostKey {SSH_DIR}/host_key\nAuthorizedKeysFile {SSH_DIR}/authorized_keys\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
            f"PermitRootLogin prohibit-password\nPermitUserEnvironment no\nPidFile {config}.pid\n"
        )
    os.makedirs("/run/sshd", exist_ok=True)
    daemon = ["/usr/sbin/sshd", "-D", "-e", "-f", config]
    if rank_logs or orphan_timeout:  # the runner starts ranks here too, writing their lines to files
        supervise(daemon, rank_logs, orphan_timeout)
    os.execv(daemon[0], daemon)


def hold(rank_logs: str | None, orphan_timeout: float | None) -> None:
    offsets: dict[str, int] = {}
    lapsed = threading.Event()

    def stop(*_) -> None:
        if rank_logs:
            _print_rank_lines(rank_logs, offsets, final=True)
        sys.exit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    watch_lease(orphan_timeout, lapsed.set)
    while not lapsed.wait(0.2 if rank_logs else 5):
        if rank_logs:
            _print_rank_lines(rank_logs, offsets, final=False)
    stop()


def pack(folders: list[str]) -> None:
    """``folders`` as a tar stream on stdout, sent as it is read (a limited sidecar's memory holds a
    block, not the outputs), ended by a manifest: each file's size and SHA-256, read on their own."""
    with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as tar:
        for folder in folders:
            if os.path.isdir(folder):
                tar.add(folder)
        files = {path: [os.path.getsize(path), sha256_of(path)] for path in _files(folders)}
        manifest = json.dumps(files).encode()
        entry = tarfile.TarInfo(MANIFEST)
        entry.size = len(manifest)
        tar.addfile(entry, io.BytesIO(manifest))
    sys.stdout.flush()


def _files(folders: list[str]) -> list[str]:
    found = []
    for folder in folders:
        for parent, _, names in os.walk(folder):
            paths = (os.path.join(parent, name) for name in names)
            found.extend(path for path in paths if os.path.isfile(path) and not os.path.islink(path))
    return found


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as source:
        while block := source.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run")
    run_parser.add_argument("--ssh-peer", action="append", default=[])
    run_parser.add_argument("--rank-logs", default=None)
    run_parser.add_argument("--replica-of-pod", action="store_true")
    run_parser.add_argument("--orphan-timeout", type=float, default=None)
    run_parser.add_argument("argv", nargs=argparse.REMAINDER)
    sshd_parser = commands.add_parser("sshd")
    sshd_parser.add_argument("--port", type=int, default=2222)
    sshd_parser.add_argument("--rank-logs", default=None)
    sshd_parser.add_argument("--orphan-timeout", type=float, default=None)
    hold_parser = commands.add_parser("hold")
    hold_parser.add_argument("--rank-logs", default=None)
    hold_parser.add_argument("--orphan-timeout", type=float, default=None)
    commands.add_parser("unpack")
    pack_parser = commands.add_parser("pack")
    pack_parser.add_argument("folders", nargs="*", default=["outputs", "logs"])
    args = parser.parse_args()
    if args.command == "run":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        if args.replica_of_pod:
            argv = replica_of_pod()
        run(argv, args.ssh_peer, args.rank_logs, args.orphan_timeout)
    elif args.command == "sshd":
        sshd(args.port, args.rank_logs, args.orphan_timeout)
    elif args.command == "hold":
        hold(args.rank_logs, args.orphan_timeout)
    elif args.command == "unpack":
        unpack()
    else:
        pack(args.folders)


if __name__ == "__main__":
    main()
