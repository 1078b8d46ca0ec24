"""An endpoint's hands on the host that serves it: what a deploy task does there besides reading and
writing the endpoint's files. The local backend calls these functions; the SSH backend ships this file
beside the supervisor and the model server and runs ``python -I endpoint_agent.py COMMAND ...``, which
prints one JSON value.

- ``running FOLDER``: the pid of the endpoint's supervisor, null when it does not run;
- ``ensure FOLDER HOST PORT``: the endpoint's supervisor runs, with the key whose hash the deploy task
  left in ``key.sha256.wanted`` (one running with another key is ended first: its servers must learn
  the new one). ``PORT`` ``0``: a free one, kept by the endpoint from then on;
- ``reload FOLDER``: tell the supervisor to read ``desired.json`` again;
- ``ping PORT``: whether a server answers ``GET /ping`` on this host's loopback at ``PORT``;
- ``requirements JSON``: which of the pinned requirements this interpreter (the one serving) lacks;
- ``environment ROOT JSON [UV_SETTINGS]``: this interpreter's packages plus those requirements, in an
  environment built once per content (``environments.py``, as jobs' are), cached under ``ROOT``;
- ``undeploy FOLDER``: end the supervisor (and with it every server) and remove the folder;
- ``lock ROOT ENDPOINT``: hold the endpoint's lock until standard input ends (the deploy task's SSH
  channel closing), printing ``"locked"`` once it is held.

Standard library only (a version's requirements are read with ``packaging`` where it is installed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

if __package__:
    from airflow_provider_dnntrain.backends.common import endpoint_supervisor, environments
else:  # run by path on a host, beside endpoint_supervisor.py; -I leaves this folder off the path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import endpoint_supervisor
    import environments

SUPERVISOR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "endpoint_supervisor.py")
CARRIED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")  # nothing of the caller's secrets
STARTUP_SECONDS = 30


class AgentError(RuntimeError):
    """What went wrong on the host, said as the host saw it."""


def _read(folder: str, name: str) -> dict:
    try:
        return endpoint_supervisor.read_json(os.path.join(folder, name))
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def supervisor_pid(folder: str) -> int | None:
    """The endpoint's supervisor's pid, if it runs (and is that endpoint's: pids are reused)."""
    pid = _read(folder, "status.json").get("pid")
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().split(b"\0")
    except (OSError, TypeError):
        return None
    return pid if os.path.abspath(folder).encode() in command else None


def ensure(folder: str, host: str, port: str) -> dict:
    folder = os.path.abspath(folder)
    wanted, key_file = os.path.join(folder, "key.sha256.wanted"), os.path.join(folder, "key.sha256")
    pid = supervisor_pid(folder)
    if pid is not None and _same_text(wanted, key_file):
        os.unlink(wanted)
        return {"pid": pid, "started": False}
    if pid is not None:
        end(pid)
    os.replace(wanted, key_file)
    if not _read(folder, "endpoint.json"):
        chosen = int(port) or _free_port(host)
        endpoint_supervisor.write_json(os.path.join(folder, "endpoint.json"), {"host": host, "port": chosen})
    if not os.path.isfile(os.path.join(folder, "desired.json")):
        endpoint_supervisor.write_json(os.path.join(folder, "desired.json"), {"active": None, "slots": {}})
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(folder, "status.json"))
    _detach([sys.executable, SUPERVISOR, folder], os.path.join(folder, "supervisor.log"))
    deadline = time.monotonic() + STARTUP_SECONDS
    while "slots" not in _read(folder, "status.json"):
        if time.monotonic() > deadline:
            raise AgentError(f"the endpoint's supervisor did not start; its log:\n{_tail(folder)}")
        time.sleep(0.1)
    return {"pid": supervisor_pid(folder), "started": True}


def _same_text(one: str, other: str) -> bool:
    try:
        with open(one) as first, open(other) as second:
            return first.read() == second.read()
    except FileNotFoundError:
        return False


def _detach(argv: list[str], log_path: str) -> None:
    """Started by a process that ends at once: the supervisor is nobody's child (it outlives the
    deploy task and, on a host, the SSH session), in a session of its own."""
    env = {name: os.environ[name] for name in CARRIED_ENV if name in os.environ}
    detach = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
    with open(log_path, "ab") as log:
        subprocess.run(
            [sys.executable, "-c", detach, *argv], stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            env=env, check=True,
        )  # fmt: skip


def _free_port(host: str) -> int:
    """Below the ephemeral range, so no outgoing connection takes it before the supervisor binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((host, port))
                return port
            except OSError:
                continue
    raise AgentError(f"no free port on {host}")


def _tail(folder: str, name: str = "supervisor.log") -> str:
    try:
        with open(os.path.join(folder, name), errors="replace") as handle:
            return handle.read()[-3000:]
    except FileNotFoundError:
        return "(no log)"


def end(pid: int, grace: float = 30) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
        time.sleep(0.1)


def reload(folder: str) -> bool:
    pid = supervisor_pid(folder)
    if pid is None:
        raise AgentError("the endpoint's supervisor is not running; deploy again")
    os.kill(pid, signal.SIGHUP)
    return True


def ping(port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{int(port)}/ping", timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def requirements(lines_json: str) -> list[list[str]]:
    """``[requirement, version here or ""]`` for each pinned requirement this interpreter lacks."""
    import importlib.metadata

    missing = []
    for line in json.loads(lines_json):
        name, wanted = _parsed(line)
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not wanted(installed):
            missing.append([line, installed or ""])
    return missing


def environment(root: str, lines_json: str, uv_settings_json: str = "{}") -> dict:
    """An environment of this interpreter's packages plus the requirements it lacks, built once per
    content and cached under ``root`` like jobs' environments: ``{"python", "key", "built"}``."""
    try:
        built = environments.ensure_environment(
            root, sys.executable, json.loads(lines_json), "", json.loads(uv_settings_json)
        )
    except environments.EnvironmentBuildFailed as error:
        raise AgentError(f"the model's environment could not be built: {error}") from None
    return {"python": built["python"], "key": built["key"], "built": built["built"]}


def _parsed(line: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # a bare interpreter: pins are compared as text
        name, _, version = line.partition("==")
        return name.strip(), lambda installed: not version or installed == version.strip()
    requirement = Requirement(line)
    return requirement.name, lambda installed: requirement.specifier.contains(installed, prereleases=True)


def undeploy(folder: str) -> bool:
    if not os.path.exists(folder):
        return False
    pid = supervisor_pid(folder)
    if pid is not None:
        end(pid)
    shutil.rmtree(folder)  # the lock file is beside it and stays: one unlinked while held lets two in
    return True


@contextlib.contextmanager
def locked(root: str, endpoint: str):
    os.makedirs(root, mode=0o700, exist_ok=True)
    with open(os.path.join(root, f".{endpoint}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def lock(root: str, endpoint: str) -> None:
    with locked(root, endpoint):
        print(json.dumps("locked"), flush=True)
        sys.stdin.read()  # until the caller's channel closes (or its connection dies)


COMMANDS = {
    "running": supervisor_pid,
    "ensure": ensure,
    "reload": reload,
    "ping": ping,
    "requirements": requirements,
    "environment": environment,
    "undeploy": undeploy,
    "lock": lock,
}


def main(argv: list[str]) -> int:
    os.umask(0o077)
    command, *rest = argv
    try:
        result = COMMANDS[command](*rest)
    except AgentError as error:
        print(str(error), file=sys.stderr)
        return 3
    if command != "lock":
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
