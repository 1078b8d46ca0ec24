"""Endpoints on a host of an Airflow SSH connection: the same supervisor as on the worker's host
(:mod:`..common.endpoint_supervisor`), shipped with its agent and the model server, started detached
so that it outlives the deploy task and its SSH session. The deploy task reads and writes the
endpoint's files over SFTP, runs the agent's commands, reaches a new version's own server (on the
host's loopback) through the SSH connection, and holds the endpoint's lock on the host for as long as
it changes the endpoint, so two workers deploying one endpoint go one after the other.
"""

from __future__ import annotations

import contextlib
import json
import posixpath
import shlex
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

from airflow_provider_dnntrain.backends.common import (
    endpoint_agent,
    endpoint_supervisor,
    environments,
    host_cache,
    model_server,
)
from airflow_provider_dnntrain.backends.common.supervised_serving import SupervisedServing
from airflow_provider_dnntrain.backends.common.tunnels import local_forward
from airflow_provider_dnntrain.backends.serving import ServingFailed, checked_endpoint
from airflow_provider_dnntrain.backends.ssh.remote import (
    HostUnreachable,
    RemoteCommandFailed,
    RemoteHost,
    hosts_from_connections,
)

_SHIPPED = (endpoint_agent, endpoint_supervisor, model_server, environments, host_cache)
COMMAND_TIMEOUT_SECONDS = 90


class SSHServing(SupervisedServing):
    """Models served on the host of SSH connection ``ssh_conn_id`` (the first of its ``hosts``, or the
    one whose host is ``on_host``), listening on ``host`` (``0.0.0.0``: every address of the host) and
    ``port`` (None: a free one, kept by the endpoint). Clients reach it at the connection's
    ``address`` (else its host). ``python``: the serving interpreter on the host, with MLflow and the
    model's framework (default: the connection's extra ``python``, else this worker's path).
    ``root``: the endpoints' folders on the host (relative: to the home), one folder per host name
    within it, so that hosts sharing a home do not share endpoints. A version's requirements the
    interpreter lacks: an environment built on the host (``uv_settings``), as the launcher builds jobs'.
    """

    poll_seconds = 0.2

    def __init__(
        self,
        *,
        ssh_conn_id: str,
        on_host: str | None = None,
        host: str = "0.0.0.0",
        port: int | None = None,
        python: str | None = None,
        root: str = ".dnntrain/endpoints",
        startup_timeout: float = 180,
        build_environments: bool = True,
        uv_settings: dict | None = None,
    ) -> None:
        super().__init__(
            host=host, port=port, startup_timeout=startup_timeout,
            build_environments=build_environments, uv_settings=uv_settings,
        )  # fmt: skip
        self.ssh_conn_id = ssh_conn_id
        self.on_host = on_host
        self.python_path = python
        self.root = root
        self._remote: RemoteHost | None = None
        self._root_on_host = ""
        self._made: set[str] = set()

    def __deepcopy__(self, memo):  # an operator's copy: same settings, no connection of its own yet
        return SSHServing(
            ssh_conn_id=self.ssh_conn_id, on_host=self.on_host, host=self.host, port=self.port,
            python=self.python_path, root=self.root, startup_timeout=self.startup_timeout,
            build_environments=self.build_environments, uv_settings=self.uv_settings,
        )  # fmt: skip

    # -- the host -------------------------------------------------------------------------------------

    def _host(self) -> RemoteHost:
        if self._remote is None:
            specs = hosts_from_connections([self.ssh_conn_id])
            chosen = [s for s in specs if self.on_host in (None, s.host, s.peer_address)]
            if not chosen:
                raise ValueError(f"on_host: {self.on_host!r} is not a host of connection {self.ssh_conn_id}")
            remote = RemoteHost(chosen[0], "serving").connect()
            node = remote.run(["uname", "-n"], COMMAND_TIMEOUT_SECONDS).strip()
            self._root_on_host = posixpath.join(remote.absolute(self.root), node)
            self._remote = remote
            for module in _SHIPPED:
                self._write_text(self._shipped(module), Path(module.__file__).read_text())
        return self._remote

    def _shipped(self, module) -> str:
        return f"{self._root_on_host}/.bin/{Path(module.__file__).name}"

    def close(self) -> None:
        remote, self._remote = self._remote, None
        self._made.clear()
        if remote is not None:
            remote.close()

    @property
    def python(self) -> str:
        return self.python_path or self._host().spec.python or sys.executable

    def environments_root(self) -> str:
        """Beside the endpoints' root, where the SSH launcher builds jobs' environments too."""
        self._host()
        return posixpath.join(posixpath.dirname(posixpath.dirname(self._root_on_host)), "environments")

    def folder_path(self, endpoint: str) -> str:
        self._host()
        return f"{self._root_on_host}/{checked_endpoint(endpoint)}"

    def public_address(self) -> str:
        if self.host not in ("0.0.0.0", "::", ""):
            return self.host
        return self._host().spec.peer_address

    # -- what the shared part asks of a backend ------------------------------------------------------------

    def _agent_argv(self, command: str, *args: str) -> list[str]:
        return [self.python, "-I", self._shipped(endpoint_agent), command, *args]

    def _agent(self, command: str, *args: str):
        timeout = environments.BUILD_TIMEOUT_SECONDS if command == "environment" else COMMAND_TIMEOUT_SECONDS
        try:
            return json.loads(self._host().run(self._agent_argv(command, *args), timeout))
        except (RemoteCommandFailed, HostUnreachable) as error:
            raise ServingFailed(str(error)) from error

    def _read_text(self, path: str) -> str | None:
        try:
            return self._host().get(path).decode(errors="replace")
        except FileNotFoundError:
            return None

    def _write_text(self, path: str, text: str) -> None:
        self._make(posixpath.dirname(path))
        self._host().put(text.encode(), path)

    def _make(self, folder: str) -> None:
        if folder not in self._made:
            self._host().makedirs(folder)
            self._made.add(folder)

    def _upload(self, local: Path, path: str) -> None:
        """Into a folder of its own first, renamed into place whole."""
        host = self._host()
        with contextlib.suppress(FileNotFoundError):
            host.sftp.stat(path)
            return
        partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
        for source in sorted(local.rglob("*")):
            target = f"{partial}/{source.relative_to(local).as_posix()}"
            if source.is_dir():
                self._make(target)
            else:
                self._make(posixpath.dirname(target))
                host.put_file(source, target)
        host.sftp.posix_rename(partial, path)

    @contextlib.contextmanager
    def locked(self, endpoint: str) -> Iterator[None]:
        """The agent holds the lock on the host while this channel is open."""
        host = self._host()
        argv = self._agent_argv("lock", self._root_on_host, checked_endpoint(endpoint))
        channel = host.connect().client.get_transport().open_session(timeout=COMMAND_TIMEOUT_SECONDS)
        try:
            channel.exec_command(shlex.join(argv))
            said = channel.makefile("rb").readline()
            if said.strip() != b'"locked"':
                error = channel.makefile_stderr("rb").read().decode(errors="replace")[-2000:]
                raise ServingFailed(f"endpoint {endpoint}: could not take its lock on {host.spec}: {error}")
            yield
        finally:
            with contextlib.suppress(Exception):
                channel.shutdown_write()  # the agent's standard input ends: it lets go and exits
                channel.status_event.wait(COMMAND_TIMEOUT_SECONDS)
            channel.close()
            self.close()

    @contextlib.contextmanager
    def reaching(self, endpoint: str, slot: str) -> Iterator[str]:
        port = self._running(endpoint)["slots"][slot]["port"]
        transport = self._host().connect().client.get_transport()
        target = ("127.0.0.1", port)  # the host's loopback, through the connection (ssh -L)
        with local_forward(lambda: transport.open_channel("direct-tcpip", target, ("127.0.0.1", 0))) as local:
            yield f"http://127.0.0.1:{local}"
