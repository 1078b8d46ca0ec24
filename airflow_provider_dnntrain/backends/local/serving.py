"""Endpoints on the Airflow worker's host: one detached supervisor per endpoint
(:mod:`..common.endpoint_supervisor`), which outlives the deploy task, listens on the endpoint's port,
runs each version's server in a slot and restarts it when it dies. An endpoint's folder is
``$AIRFLOW_HOME/dnntrain/endpoints/<endpoint>``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_dnntrain.backends.common import endpoint_agent
from airflow_provider_dnntrain.backends.common.folders import beside_runs
from airflow_provider_dnntrain.backends.common.supervised_serving import SupervisedServing
from airflow_provider_dnntrain.backends.serving import ServingFailed, checked_endpoint


class LocalServing(SupervisedServing):
    """Models served on this worker's host, at ``host`` (``127.0.0.1``: this host only; ``0.0.0.0``:
    every address) and ``port`` (None: a free one, kept by the endpoint), by this worker's interpreter
    (or an environment of its packages plus a version's requirements it lacks)."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        root: str | Path | None = None,
        startup_timeout: float = 180,
        build_environments: bool = True,
        uv_settings: dict | None = None,
        environments_root: str | Path | None = None,
    ) -> None:
        super().__init__(
            host=host, port=port, startup_timeout=startup_timeout,
            build_environments=build_environments, uv_settings=uv_settings,
        )  # fmt: skip
        self.root = Path(root) if root else beside_runs("endpoints")
        self._environments = Path(environments_root) if environments_root else beside_runs("environments")

    def folder(self, endpoint: str) -> Path:
        return self.root / checked_endpoint(endpoint)

    def folder_path(self, endpoint: str) -> str:
        return str(self.folder(endpoint))

    @property
    def python(self) -> str:
        return sys.executable

    def environments_root(self) -> str:
        return str(self._environments)  # the launcher's: jobs and models share built environments

    def locked(self, endpoint: str) -> contextlib.AbstractContextManager:
        return endpoint_agent.locked(str(self.root), checked_endpoint(endpoint))

    def _agent(self, command: str, *args: str):
        try:
            return endpoint_agent.COMMANDS[command](*args)
        except endpoint_agent.AgentError as error:
            raise ServingFailed(str(error)) from error

    def _read_text(self, path: str) -> str | None:
        try:
            return Path(path).read_text(errors="replace")
        except (FileNotFoundError, NotADirectoryError):
            return None

    def _write_text(self, path: str, text: str) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
        with open(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as handle:
            handle.write(text)
        os.replace(partial, path)

    def _upload(self, local: Path, path: str) -> None:
        if not Path(path).is_dir():
            shutil.copytree(local, path)

    @contextlib.contextmanager
    def reaching(self, endpoint: str, slot: str) -> Iterator[str]:
        yield f"http://127.0.0.1:{self._running(endpoint)['slots'][slot]['port']}"

    def public_address(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def endpoints(self) -> list[str]:
        """The endpoints this host has."""
        found = self.root.glob("*/endpoint.json") if self.root.is_dir() else []
        return sorted(path.parent.name for path in found)
