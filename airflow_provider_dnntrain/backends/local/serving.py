"""Endpoints on the Airflow worker's host: one detached supervisor per endpoint
(:mod:`..common.endpoint_supervisor`), which outlives the deploy task, listens on the endpoint's port,
runs each version's server in a slot and restarts it when it dies.

This side writes what the supervisor should run (``desired.json``), signals it, and reads what it
runs (``status.json``). An endpoint's folder is ``$AIRFLOW_HOME/dnntrain/endpoints/<endpoint>``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_dnntrain.backends.common import endpoint_supervisor
from airflow_provider_dnntrain.backends.common.folders import beside_runs
from airflow_provider_dnntrain.backends.common.ports import free_port
from airflow_provider_dnntrain.backends.serving import (
    EndpointState,
    ServedVersion,
    Serving,
    ServingFailed,
    checked_endpoint,
)

_SLOTS = ("blue", "green")
_CARRIED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")  # nothing of the task's secrets


class LocalServing(Serving):
    """Models served on this worker's host, at ``host`` (``127.0.0.1``: this host only; ``0.0.0.0``:
    every address) and ``port`` (None: a free one, kept by the endpoint)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        root: str | Path | None = None,
        startup_timeout: float = 180,
    ) -> None:
        self.host = host
        self.port = port
        self.root = Path(root) if root else beside_runs("endpoints")
        self.startup_timeout = startup_timeout

    # -- the endpoint's files and supervisor ---------------------------------------------------------

    def folder(self, endpoint: str) -> Path:
        return self.root / checked_endpoint(endpoint)

    @contextlib.contextmanager
    def locked(self, endpoint: str) -> Iterator[None]:
        checked_endpoint(endpoint)
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{endpoint}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _read(self, endpoint: str, name: str) -> dict:
        try:
            return json.loads((self.folder(endpoint) / name).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _supervisor(self, endpoint: str) -> int | None:
        """The endpoint's supervisor's pid, if it runs (and is that endpoint's: pids are reused)."""
        pid = self._read(endpoint, "status.json").get("pid")
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, TypeError):
            return None
        return pid if str(self.folder(endpoint)).encode() in command else None

    def _ensure_supervisor(self, endpoint: str, key_hash: str) -> None:
        folder = self.folder(endpoint)
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / "key.sha256"
        pid = self._supervisor(endpoint)
        if pid is not None and key_file.is_file() and key_file.read_text() == key_hash:
            return
        if pid is not None:  # a new key: the servers must learn it
            self._end(pid)
        where = self._read(endpoint, "endpoint.json")
        if not where:
            port = self.port or free_port(self.host, taken=set())
            where = {"host": self.host, "port": port}
            endpoint_supervisor.write_json(str(folder / "endpoint.json"), where)
        key_file.write_text(key_hash)
        if not (folder / "desired.json").is_file():
            endpoint_supervisor.write_json(str(folder / "desired.json"), {"active": None, "slots": {}})
        (folder / "status.json").unlink(missing_ok=True)
        env = {name: os.environ[name] for name in _CARRIED_ENV if name in os.environ}
        # Started by a process that ends at once: the supervisor is nobody's child here (it outlives
        # this task; its parent becomes init), in a session of its own.
        detach = "import subprocess, sys; subprocess.Popen(sys.argv[1:], start_new_session=True)"
        argv = [sys.executable, "-c", detach, sys.executable, endpoint_supervisor.__file__, str(folder)]
        with open(folder / "supervisor.log", "ab") as log:
            subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env, check=True)
        self._wait(endpoint, lambda status: "slots" in status, "its supervisor to start")

    def _end(self, pid: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)

    def _want(self, endpoint: str, change) -> None:
        desired = self._read(endpoint, "desired.json") or {"active": None, "slots": {}}
        change(desired)
        endpoint_supervisor.write_json(str(self.folder(endpoint) / "desired.json"), desired)
        pid = self._supervisor(endpoint)
        if pid is None:
            raise ServingFailed(f"endpoint {endpoint}: its supervisor is not running; deploy again")
        os.kill(pid, signal.SIGHUP)

    def _wait(self, endpoint: str, done, what: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._read(endpoint, "status.json")
            if done(status):
                return status
            time.sleep(0.1)
        log = (self.folder(endpoint) / "supervisor.log").read_text()[-2000:]
        raise ServingFailed(f"endpoint {endpoint}: gave up waiting for {what}; supervisor log:\n{log}")

    # -- the interface --------------------------------------------------------------------------------

    def current(self, endpoint: str) -> EndpointState:
        where = self._read(endpoint, "endpoint.json")
        status = self._read(endpoint, "status.json") if self._supervisor(endpoint) else {}
        base = f"http://{_reachable(where.get('host', self.host))}:{where.get('port', 0)}"
        slots = {name: slot["version"] for name, slot in status.get("slots", {}).items()}
        active = status.get("active")
        return EndpointState(
            endpoint=endpoint,
            scoring_uri=f"{base}/invocations",
            health_uri=f"{base}/ping",
            serving=slots.get(active) if active else None,
            state="serving" if active else "absent",
            slots=slots,
        )

    def endpoints(self) -> list[str]:
        """The endpoints this host has."""
        found = self.root.glob("*/endpoint.json") if self.root.is_dir() else []
        return sorted(path.parent.name for path in found)

    def served_model_dir(self, endpoint: str) -> Path | None:
        """The files of the version that takes the endpoint's traffic."""
        desired = self._read(endpoint, "desired.json")
        active = desired.get("slots", {}).get(desired.get("active") or "")
        return Path(active["model_dir"]) if active else None

    def start(self, endpoint: str, version: ServedVersion, key_hash: str) -> str:
        _check_requirements(version)
        self._ensure_supervisor(endpoint, key_hash)
        slot = self._free_slot(endpoint)
        model_dir = self.folder(endpoint) / "versions" / f"{version.name}-{version.version}"
        if not model_dir.is_dir():
            shutil.copytree(version.model_dir, model_dir)
        spec = {"python": sys.executable, "model_dir": str(model_dir), "version": version.label}
        self._want(endpoint, lambda desired: desired["slots"].__setitem__(slot, spec))
        started = lambda s: s.get("slots", {}).get(slot, {}).get("version") == version.label  # noqa: E731
        status = self._wait(endpoint, started, f"slot {slot}")
        self._wait_for_probe(endpoint, slot, status["slots"][slot]["port"])
        return slot

    def _free_slot(self, endpoint: str) -> str:
        """The slot that does not take the traffic (whatever an interrupted deploy left there goes)."""
        desired = self._read(endpoint, "desired.json")
        return next(name for name in _SLOTS if name != desired.get("active"))

    def _wait_for_probe(self, endpoint: str, slot: str, port: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if _answers(f"http://127.0.0.1:{port}/ping"):
                return
            if self._read(endpoint, "status.json").get("slots", {}).get(slot, {}).get("starts", 0) > 2:
                break  # it keeps ending: it will not come up
            time.sleep(0.3)
        self.stop(endpoint, slot)
        log = (self.folder(endpoint) / "logs" / f"{slot}.log").read_text(errors="replace")[-3000:]
        raise ServingFailed(
            f"endpoint {endpoint}: the new version never answered /ping; its log ends:\n{log}"
        )

    def slot_uri(self, endpoint: str, slot: str) -> str:
        return f"http://127.0.0.1:{self._read(endpoint, 'status.json')['slots'][slot]['port']}"

    def switch(self, endpoint: str, slot: str) -> EndpointState:
        self._want(endpoint, lambda desired: desired.__setitem__("active", slot))
        self._wait(endpoint, lambda status: status.get("active") == slot, f"the switch to {slot}")
        return self.current(endpoint)

    def stop(self, endpoint: str, slot: str) -> None:
        def without(desired: dict) -> None:
            spec = desired["slots"].pop(slot, None)
            if desired.get("active") == slot:
                desired["active"] = None
            if spec and all(other["model_dir"] != spec["model_dir"] for other in desired["slots"].values()):
                shutil.rmtree(spec["model_dir"], ignore_errors=True)

        self._want(endpoint, without)
        self._wait(endpoint, lambda status: slot not in status.get("slots", {}), f"slot {slot} to stop")

    def undeploy(self, endpoint: str) -> bool:
        folder = self.folder(endpoint)
        if not folder.exists():
            return False
        pid = self._supervisor(endpoint)
        if pid is not None:
            self._end(pid)
        shutil.rmtree(folder)  # the lock file stays: one unlinked while held would let two tasks in
        return True


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


def _reachable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


def _check_requirements(version: ServedVersion) -> None:
    """The version's pinned requirements, as this worker's interpreter (which serves it) has them."""
    import importlib.metadata

    from packaging.requirements import Requirement

    missing = []
    for line in version.requirements:
        wanted = Requirement(line)
        try:
            installed = importlib.metadata.version(wanted.name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        if installed is None or not wanted.specifier.contains(installed, prereleases=True):
            missing.append(f"{line} (here: {installed or 'not installed'})")
    if missing:
        raise ServingFailed(
            f"{version.label} needs what this worker's interpreter lacks: {', '.join(missing)}; "
            "serve it where its requirements are installed"
        )
