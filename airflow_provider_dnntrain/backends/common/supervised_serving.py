"""Serving on a host through an endpoint supervisor (:mod:`.endpoint_supervisor`): the part the local
and SSH backends share. The deploy task writes what the supervisor should run (``desired.json``),
tells it to read it again (:mod:`.endpoint_agent` ``reload``) and waits for ``status.json`` to say it
runs it. A backend says how to reach its host: files, the agent's commands, and a slot's loopback port.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from abc import abstractmethod
from collections.abc import Callable
from pathlib import Path

from airflow_provider_dnntrain.backends.serving import (
    EndpointState,
    ServedVersion,
    Serving,
    ServingFailed,
    checked_endpoint,
)

SLOTS = ("blue", "green")
_EMPTY = {"active": None, "slots": {}}


class SupervisedServing(Serving):
    """An endpoint per folder under ``root`` on one host, at ``host`` (the address it listens on) and
    ``port`` (None: a free one, kept by the endpoint). A version whose pinned requirements the serving
    interpreter lacks is served from an environment of its packages plus those, built with ``uv``
    once per content and cached (``build_environments=False``: refused instead; ``uv_settings``:
    ``UV_*`` variables of the builds, as the launchers take them)."""

    poll_seconds = 0.1

    def __init__(
        self,
        *,
        host: str,
        port: int | None,
        startup_timeout: float,
        build_environments: bool = True,
        uv_settings: dict | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.startup_timeout = startup_timeout
        self.build_environments = build_environments
        self.uv_settings = dict(uv_settings or {})
        self.log: Callable[[str], None] = logging.getLogger(__name__).info

    # -- what a backend provides ------------------------------------------------------------------

    @abstractmethod
    def folder_path(self, endpoint: str) -> str:
        """The endpoint's folder on its host."""

    @property
    @abstractmethod
    def python(self) -> str:
        """The interpreter that serves, on the host."""

    @abstractmethod
    def environments_root(self) -> str:
        """Where models' environments are built and cached on the host."""

    @abstractmethod
    def _agent(self, command: str, *args: str):
        """Run an :mod:`.endpoint_agent` command on the host; its result, or ``ServingFailed``."""

    @abstractmethod
    def _read_text(self, path: str) -> str | None:
        """A file on the host (None if there is none)."""

    @abstractmethod
    def _write_text(self, path: str, text: str) -> None:
        """Written whole (a reader never sees half of it), owner-only; its folder made if need be."""

    @abstractmethod
    def _upload(self, local: Path, path: str) -> None:
        """A folder of this worker's copied to ``path`` on the host (kept as it is if there already)."""

    @abstractmethod
    def reaching(self, endpoint: str, slot: str) -> contextlib.AbstractContextManager[str]:
        """A base URL this worker reaches the slot's own server at, while the context lasts."""

    @abstractmethod
    def public_address(self) -> str:
        """How clients name the host in the endpoint's URLs."""

    # -- the endpoint's files and supervisor --------------------------------------------------------

    def _read(self, endpoint: str, name: str) -> dict:
        text = self._read_text(f"{self.folder_path(endpoint)}/{name}")
        try:
            return json.loads(text) if text else {}
        except json.JSONDecodeError:
            return {}

    def _running(self, endpoint: str) -> dict:
        """The supervisor's status, or {} when it has none (never started, or undeployed)."""
        return self._read(endpoint, "status.json")

    def _ensure_supervisor(self, endpoint: str, key_hash: str) -> None:
        folder = self.folder_path(endpoint)
        self._write_text(f"{folder}/key.sha256.wanted", key_hash)
        self._agent("ensure", folder, self.host, str(self.port or 0))

    def _want(self, endpoint: str, change: Callable[[dict], None]) -> None:
        desired = self._read(endpoint, "desired.json") or json.loads(json.dumps(_EMPTY))
        change(desired)
        self._write_text(f"{self.folder_path(endpoint)}/desired.json", json.dumps(desired))
        self._agent("reload", self.folder_path(endpoint))

    def _wait(self, endpoint: str, done: Callable[[dict], bool], what: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self._running(endpoint)
            if done(status):
                return status
            time.sleep(self.poll_seconds)
        log = self._tail(endpoint, "supervisor.log")
        raise ServingFailed(f"endpoint {endpoint}: gave up waiting for {what}; supervisor log:\n{log}")

    def _tail(self, endpoint: str, name: str) -> str:
        return (self._read_text(f"{self.folder_path(endpoint)}/{name}") or "(no log)")[-3000:]

    # -- the interface --------------------------------------------------------------------------------

    def current(self, endpoint: str) -> EndpointState:
        checked_endpoint(endpoint)
        where = self._read(endpoint, "endpoint.json")
        alive = self._agent("running", self.folder_path(endpoint)) is not None
        status = self._running(endpoint) if alive else {}
        base = f"http://{self.public_address()}:{where.get('port', 0)}"
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

    def start(self, endpoint: str, version: ServedVersion, key_hash: str) -> str:
        python = self._interpreter_for(version)
        self._ensure_supervisor(endpoint, key_hash)
        slot = self._free_slot(endpoint)
        model_dir = f"{self.folder_path(endpoint)}/versions/{version.name}-{version.version}"
        self._upload(version.model_dir, model_dir)
        spec = {"python": python, "model_dir": model_dir, "version": version.label}
        self._want(endpoint, lambda desired: desired["slots"].__setitem__(slot, spec))
        started = lambda s: s.get("slots", {}).get(slot, {}).get("version") == version.label  # noqa: E731
        self._wait(endpoint, started, f"slot {slot}")
        self._wait_for_probe(endpoint, slot)
        return slot

    def _interpreter_for(self, version: ServedVersion) -> str:
        """The serving interpreter, or, when it lacks some of the version's pinned requirements, an
        environment of its packages plus those (built once per content, cached on the host)."""
        missing = self._agent("requirements", json.dumps(list(version.requirements)))
        if not missing:
            return self.python
        said = ", ".join(f"{line} (here: {here or 'not installed'})" for line, here in missing)
        if not self.build_environments:
            raise ServingFailed(
                f"{version.label} needs what the serving interpreter ({self.python}) lacks: {said}; "
                "serve it where its requirements are installed, or let environments be built"
            )
        started = time.monotonic()
        built = self._agent("environment", self.environments_root(), json.dumps([m[0] for m in missing]),
                            json.dumps(self.uv_settings))  # fmt: skip
        self.log(
            f"{version.label} needs {said}: environment {built['key']} "
            f"{'built' if built['built'] else 'reused'} in {time.monotonic() - started:.1f} s"
        )
        return built["python"]

    def _free_slot(self, endpoint: str) -> str:
        """The slot that does not take the traffic (whatever an interrupted deploy left there goes)."""
        desired = self._read(endpoint, "desired.json")
        return next(name for name in SLOTS if name != desired.get("active"))

    def _wait_for_probe(self, endpoint: str, slot: str) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            described = self._running(endpoint).get("slots", {}).get(slot, {})
            if described.get("pid") and self._agent("ping", str(described["port"])):
                return
            if described.get("starts", 0) > 2:
                break  # it keeps ending: it will not come up
            time.sleep(0.3)
        self.stop(endpoint, slot)
        raise ServingFailed(
            f"endpoint {endpoint}: the new version never answered /ping; its log ends:\n"
            f"{self._tail(endpoint, f'logs/{slot}.log')}"
        )

    def switch(self, endpoint: str, slot: str) -> EndpointState:
        self._want(endpoint, lambda desired: desired.__setitem__("active", slot))
        self._wait(endpoint, lambda status: status.get("active") == slot, f"the switch to {slot}")
        return self.current(endpoint)

    def stop(self, endpoint: str, slot: str) -> None:
        def without(desired: dict) -> None:
            desired["slots"].pop(slot, None)
            if desired.get("active") == slot:
                desired["active"] = None

        self._want(endpoint, without)
        self._wait(endpoint, lambda status: slot not in status.get("slots", {}), f"slot {slot} to stop")

    def undeploy(self, endpoint: str) -> bool:
        return bool(self._agent("undeploy", self.folder_path(checked_endpoint(endpoint))))

    def served_model_dir(self, endpoint: str) -> str | None:
        """Where the files of the version that takes the endpoint's traffic are, on the host."""
        desired = self._read(endpoint, "desired.json")
        active = desired.get("slots", {}).get(desired.get("active") or "")
        return active["model_dir"] if active else None
