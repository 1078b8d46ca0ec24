"""The SSH launcher's hands on one host: shipped as ``ssh_agent.py`` and started over SSH as
``python -I -S ssh_agent.py COMMAND JOB_DIR HOST ...``, it does one thing and prints one JSON object.

A job's folder on a host holds ``replicas/<name>`` (each replica's working directory, at the same path
on every host, as mpirun and horovodrun expect), ``dnntrain/`` (this agent, the reaper, the replica
site), the pending-variables file, and ``hosts/<HOST>/`` with what belongs to this host alone (the
source snapshot, the replicas to start, their logs, pids, exit codes and the lease), so hosts that
share a file system (an NFS home) do not collide.

- ``prepare JOB_DIR HOST N``: end what a previous launch of the same run left on this host, unpack
  the uploaded bundle and print ``N`` ports free on this host, and whether replicas run as root here;
- ``start JOB_DIR HOST``: start every replica ``host.json`` lists, each detached (own session) under
  the reaper, which keeps its subtree findable, writes its exit code, and stops it when the lease goes
  stale; prepare the working directories other hosts' runners start ranks in (``mirrors``);
- ``poll JOB_DIR HOST OFFSETS``: renew the lease; print each replica's exit code (``null`` while it
  runs) and what its logs gained since ``OFFSETS``, whole lines only. ``OFFSETS`` is how far the caller
  has logged, kept on the host (``cursor.json``) so that whoever watches the job next (a trigger on
  another triggerer, the task's next try) starts there and logs no line twice;
- ``ack JOB_DIR HOST OFFSETS``: only keep ``OFFSETS`` (a watcher leaving);
- ``stop JOB_DIR HOST GRACE [--no-wait]``: stop every replica (SIGTERM, SIGKILL after the grace) and
  sweep the launch's processes; print any pid that would not die;
- ``authorize JOB_DIR HOST LINE FILE`` / ``revoke JOB_DIR HOST MARKER FILE``: add the run's key to the
  authorized_keys ``FILE`` (relative to home) and write the ``ssh`` wrapper the runners use; remove it;
- ``marks JOB_DIR HOST``: when each replica here marked itself the primary process;
- ``outputs JOB_DIR HOST REPLICA``: pack that replica's ``outputs`` and ``logs`` into ``collected.tar``.

Standard library only: the host needs nothing but the job's Python. Linux only, like the reaper.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

# Python 3.11.4+ checks what a tar extracts; an older one (Debian 12 has 3.11.2) unpacks our own archive
# as it is.
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}

if __package__:  # imported by the launcher (for its path): the path of the importer stays as it is
    from airflow_provider_dnntrain.backends.common import reaper
else:  # run on a host as a script, beside reaper.py; -I leaves the script's folder off the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import reaper

REAPER = Path(reaper.__file__).resolve()
PRIMARY_MARKER = ".dnntrain-primary"
LAUNCH_ID_VAR = "DNNTRAIN_LAUNCH_ID"
# At most this much of one log is sent per poll; the rest comes with the next.
MAX_CHUNK = 1 << 20
_RANK_STREAMS = ("stdout", "stderr")
_REPLICA_UMASK = 0o022


class Paths:
    def __init__(self, job_dir: str, host: str) -> None:
        self.job = Path(job_dir)
        self.host = self.job / "hosts" / host

    def workdir(self, name: str) -> Path:
        return self.job / "replicas" / name

    def log(self, name: str) -> Path:
        return self.host / "logs" / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.host / "state" / f"{name}.pid"

    def exit_file(self, name: str) -> Path:
        return self.host / "state" / f"{name}.exit"

    @property
    def lease(self) -> Path:
        return self.host / "lease"

    def spec(self) -> dict:
        return json.loads((self.host / "host.json").read_text())


def prepare(paths: Paths, port_count: str) -> dict:
    if (paths.host / "host.json").exists():  # a resubmitted run id: end what its last launch left
        stop(paths, "0")
    bundle = paths.host / "bundle.tar"
    for stale in [paths.job / "replicas", *paths.host.iterdir()]:
        if stale == bundle:
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)  # replicas/ may be going from a host sharing it
        else:
            stale.unlink(missing_ok=True)
    with tarfile.open(bundle) as tar:
        tar.extractall(paths.host, **SAFE_EXTRACT)
    bundle.unlink()
    for sub in ("logs", "state"):
        (paths.host / sub).mkdir(exist_ok=True)
    (paths.job / "replicas").mkdir(exist_ok=True)
    taken: set[int] = set()
    for _ in range(int(port_count)):
        taken.add(free_port(taken))
    return {"ports": sorted(taken), "root": os.geteuid() == 0, "hostname": socket.gethostname()}


def free_port(taken: set[int]) -> int:
    """A port every address of this host has free, below the ephemeral range (as the local launcher)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        port = random.randrange(10000, low) if low > 11000 else random.randrange(1024, 65536)
        if port not in taken and _port_is_free(port):
            return port
    raise SystemExit("no free port found on this host")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def start(paths: Paths) -> dict:
    spec = paths.spec()
    paths.lease.touch()
    for replica in [*spec["replicas"], *spec["mirrors"]]:
        _make_workdir(paths, replica)
    return {"pids": {replica["name"]: _start_replica(paths, replica, spec) for replica in spec["replicas"]}}


def _make_workdir(paths: Paths, replica: dict) -> None:
    """A copy of the snapshot per replica, as on the local launcher; built aside and renamed into place,
    so a host sharing this file system finds it whole or builds its own."""
    workdir = paths.workdir(replica["name"])
    if workdir.exists():
        return
    building = workdir.with_name(f".{workdir.name}.{os.getpid()}")
    shutil.copytree(paths.host / "source", building)
    for sub in ("outputs", "logs"):
        (building / sub).mkdir(exist_ok=True)
    for relative, content in replica["files"].items():
        (building / relative).write_text(content)
    try:
        os.rename(building, workdir)
    except OSError:  # another host of the same file system was first
        shutil.rmtree(building, ignore_errors=True)


def _start_replica(paths: Paths, replica: dict, spec: dict) -> int:
    name = replica["name"]
    env = {**os.environ, **replica["env"]}
    if (paths.job / "dnntrain" / "bin").is_dir():  # the runners' ssh to the other hosts
        env["PATH"] = os.pathsep.join([str(paths.job / "dnntrain" / "bin"), env.get("PATH", os.defpath)])
    site = str(paths.job / "dnntrain" / "replica_site")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [site, env.get("PYTHONPATH")]))
    command = [sys.executable, "-I", "-S", str(REAPER), "--grace", str(spec["grace"]), "--detached"]
    command += ["--lease", str(paths.lease), "--lease-timeout", str(spec["lease_timeout"])]
    command += ["--exit-code-file", str(paths.exit_file(name)), "--", *replica["argv"]]
    with open(paths.log(name), "ab") as log:
        process = subprocess.Popen(
            command,
            cwd=paths.workdir(name),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a dropped SSH session must not take the replica with it
            umask=_REPLICA_UMASK,
        )
    stat = reaper._stat(process.pid)  # not reaped by anyone yet: this is our reaper
    _write(paths.pid_file(name), f"{process.pid} {stat[1] if stat else 0}\n")
    return process.pid


def _write(path: Path, text: str) -> None:
    written = path.with_name(path.name + ".writing")
    written.write_text(text)
    os.replace(written, path)


def _reaper_of(paths: Paths, name: str) -> dict[int, int]:
    """The replica's reaper as (pid -> start time), if it is still that same process."""
    try:
        pid, started = (int(v) for v in paths.pid_file(name).read_text().split())
    except (OSError, ValueError):
        return {}
    return reaper.alive({pid: started})


def poll(paths: Paths, offsets_json: str) -> dict:
    os.utime(paths.lease)  # someone is watching: the replicas live on
    offsets = _advance_cursor(paths, json.loads(offsets_json))
    spec = paths.spec()
    exits = {replica["name"]: _exit_code(paths, replica["name"]) for replica in spec["replicas"]}
    logs = {}
    for key, path in _log_files(paths, spec):
        offset = offsets.get(key, 0)
        finished = exits[key.split("/")[0]] is not None
        chunk = _read_lines(path, offset, whole_lines=not finished)
        if chunk:
            logs[key] = [offset, base64.b64encode(chunk).decode()]
    return {"exits": exits, "logs": logs}


def ack(paths: Paths, offsets_json: str) -> dict:
    return {"cursor": _advance_cursor(paths, json.loads(offsets_json))}


def _advance_cursor(paths: Paths, offsets: dict[str, int]) -> dict[str, int]:
    """How far each log has been logged by anyone: the furthest of ``offsets`` and the kept cursor."""
    cursor_file = paths.host / "state" / "cursor.json"
    try:
        kept = json.loads(cursor_file.read_text())
    except (OSError, ValueError):
        kept = {}
    cursor = {key: max(kept.get(key, 0), offsets.get(key, 0)) for key in {*kept, *offsets}}
    if cursor != kept:
        _write(cursor_file, json.dumps(cursor))
    return cursor


def _exit_code(paths: Paths, name: str) -> int | None:
    for attempt in range(2):  # it may write the file between the two looks
        try:
            return int(paths.exit_file(name).read_text())
        except (OSError, ValueError):
            pass
        if attempt == 0 and _reaper_of(paths, name):
            return None
    return 128 + signal.SIGKILL  # gone without a word: killed outright


def _log_files(paths: Paths, spec: dict) -> list[tuple[str, Path]]:
    """(key, path) of each replica's console log and of every per-rank file its command writes."""
    files = []
    for replica in spec["replicas"]:
        name = replica["name"]
        files.append((name, paths.log(name)))
        ranks = paths.workdir(name) / replica["rank_logs"] if replica.get("rank_logs") else None
        if ranks is not None and ranks.is_dir():
            for path in sorted(ranks.rglob("rank.*/*")):
                if path.name in _RANK_STREAMS and path.is_file():
                    files.append((f"{name}/{path.parent.name}/{path.name}", path))
    return files


def _read_lines(path: Path, offset: int, whole_lines: bool) -> bytes:
    try:
        with open(path, "rb") as stream:
            stream.seek(offset)
            data = stream.read(MAX_CHUNK)
    except OSError:
        return b""
    if whole_lines and len(data) < MAX_CHUNK:
        data = data[: data.rfind(b"\n") + 1]  # a line still being written comes whole next time
    return data


def stop(paths: Paths, grace: str, *options: str) -> dict:
    spec = paths.spec()
    reapers: dict[int, int] = {}
    for replica in spec["replicas"]:
        reapers.update(_reaper_of(paths, replica["name"]))
    reaper.send(reapers, signal.SIGTERM)  # each reaper stops its subtree, escalating after the grace
    if "--no-wait" in options:
        return {"stuck": []}
    deadline = time.monotonic() + float(grace) + reaper.KILL_WAIT_SECONDS + 2
    while reaper.alive(reapers) and time.monotonic() < deadline:
        time.sleep(0.05)
    stuck = []
    for pid, started in reaper.alive(reapers).items():  # unresponsive: its subtree, then itself
        below = reaper.descendants(pid)
        stuck += reaper.terminate(lambda below=below: reaper.alive(below), grace_seconds=0)
        stuck += reaper.terminate(lambda pid=pid, started=started: reaper.alive({pid: started}), 0)
    marker = f"{LAUNCH_ID_VAR}={spec['launch_id']}"
    stuck += reaper.terminate(lambda: reaper.processes_with_environment(marker), grace_seconds=0)
    return {"stuck": sorted(set(stuck))}


def authorize(paths: Paths, line: str, keys_file: str) -> dict:
    ssh = shutil.which("ssh")
    if ssh is None:
        raise SystemExit("no ssh client on this host: mpirun and horovodrun need one to reach the others")
    ssh_dir = paths.job / "ssh"
    options = ["-F", ssh_dir / "config", "-o", "StrictHostKeyChecking=yes"]
    options += ["-o", f"UserKnownHostsFile={ssh_dir / 'known_hosts'}", "-i", ssh_dir / "id_ed25519"]
    options += ["-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]
    wrapper = paths.job / "dnntrain" / "bin" / "ssh"
    wrapper.parent.mkdir(exist_ok=True)
    # Ahead of the runner's own options: for ssh, the first value given for an option wins.
    _write(wrapper, f'#!/bin/sh\nexec {shlex.join(map(str, [ssh, *options]))} "$@"\n')
    wrapper.chmod(0o700)
    with _locked(_home_path(keys_file)) as keys:
        if line not in keys.read().splitlines():
            keys.seek(0, os.SEEK_END)
            keys.write(line + "\n")
    return {"wrapper": str(wrapper)}


def revoke(paths: Paths, marker: str, keys_file: str) -> dict:
    with _locked(_home_path(keys_file)) as keys:
        lines = keys.read().splitlines(keepends=True)
        kept = [line for line in lines if not line.rstrip("\n").endswith(" " + marker)]
        keys.seek(0)
        keys.truncate()
        keys.write("".join(kept))
    return {"removed": len(lines) - len(kept)}


def _home_path(path: str) -> Path:
    return Path(path if os.path.isabs(path) else os.path.join(os.path.expanduser("~"), path))


@contextlib.contextmanager
def _locked(path: Path):
    """The file opened for update under an exclusive lock: hosts sharing a home edit it one at a time."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    with open(fd, "r+") as file:
        fcntl.flock(file, fcntl.LOCK_EX)
        yield file


def marks(paths: Paths) -> dict:
    """When each replica started here marked itself the primary process (global rank 0), if it did."""
    found = {}
    for replica in paths.spec()["replicas"]:
        marker = paths.workdir(replica["name"]) / PRIMARY_MARKER
        if marker.exists():
            found[replica["name"]] = marker.stat().st_mtime
    return {"marks": found}


def outputs(paths: Paths, name: str) -> dict:
    workdir = paths.workdir(name)
    with tarfile.open(paths.host / "collected.tar", "w") as tar:
        for sub in ("outputs", "logs"):
            if (workdir / sub).is_dir():
                tar.add(workdir / sub, arcname=sub)
    return {"path": str(paths.host / "collected.tar")}


COMMANDS = {
    "prepare": prepare,
    "start": start,
    "poll": poll,
    "ack": ack,
    "stop": stop,
    "marks": marks,
    "authorize": authorize,
    "revoke": revoke,
    "outputs": outputs,
}


def main(argv: list[str]) -> int:
    global _REPLICA_UMASK
    _REPLICA_UMASK = os.umask(0o077)  # what the launcher writes is the owner's only; replicas keep theirs
    command, job_dir, host, *rest = argv
    print(json.dumps(COMMANDS[command](Paths(job_dir, host), *rest)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
