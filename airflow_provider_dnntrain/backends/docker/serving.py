"""Endpoints in Docker containers: the endpoint supervisor (:mod:`..common.endpoint_supervisor`) as the
main process of a container of the endpoint's own, ``dnntrain-endpoint-<endpoint>``, which the daemon
starts again whenever it ends (restart policy ``unless-stopped``): the supervisor then serves again what
``desired.json`` says. The endpoint's folder is a volume of its own, so that a container made again (a
new key) finds its versions; its port is published on the Docker host.

The deploy task reads and writes the endpoint's files as tar streams, runs the agent
(:mod:`..common.endpoint_agent`) with ``docker exec``, reaches a new version's own server (on the
container's loopback) through a relay it execs there, and holds the daemon's lock of the endpoint
(:mod:`..common.docker_lock`) while it changes it. All of it works alike with a daemon on another host.
"""

from __future__ import annotations

import contextlib
import json
import shlex
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
from airflow_provider_dnntrain.backends.common.docker_client import OnDaemon
from airflow_provider_dnntrain.backends.common.docker_files import put_files, read_file
from airflow_provider_dnntrain.backends.common.docker_lock import daemon_lock
from airflow_provider_dnntrain.backends.common.ports import free_port
from airflow_provider_dnntrain.backends.common.supervised_serving import SupervisedServing
from airflow_provider_dnntrain.backends.common.tunnels import local_forward
from airflow_provider_dnntrain.backends.docker.containers import MANAGED_LABEL
from airflow_provider_dnntrain.backends.serving import ServingFailed, checked_endpoint

ROOT = "/endpoint"  # the endpoint's volume: its folder, and the agent's files in .bin
BIN = f"{ROOT}/.bin"
_SHIPPED = (endpoint_agent, endpoint_supervisor, model_server, environments, host_cache)
ENDPOINT_LABEL = "dnntrain.io/endpoint"
PORT_LABEL = "dnntrain.io/port"
# Carries one connection between the exec's standard streams and a port of the container's loopback.
RELAY = """
import os, socket, sys, threading
way = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
def back():
    while data := way.recv(65536):
        os.write(1, data)
    os.close(1)
threading.Thread(target=back, daemon=True).start()
while data := os.read(0, 65536):
    way.sendall(data)
way.shutdown(socket.SHUT_WR)
for thread in threading.enumerate()[1:]:
    thread.join()
"""


class DockerServing(OnDaemon, SupervisedServing):
    """Models served in a container per endpoint on the Docker daemon at ``docker_url`` (default: the
    environment's), running ``image`` (the project's training image: MLflow and the framework) with
    ``python``. The endpoint's port is ``port`` (None: one free on this worker, kept by the endpoint;
    give it for a daemon on another host), published on the Docker host's ``publish_host``; clients
    reach it at ``address`` (default: the daemon's host, ``127.0.0.1`` for a local one). A version
    whose pinned requirements the image lacks is refused: serve it on an image that has them."""

    poll_seconds = 0.2

    def __init__(
        self,
        *,
        docker_url: str | None = None,
        image: str = "dnntrain-torch:cpu",
        python: str = "python",
        port: int | None = None,
        publish_host: str = "0.0.0.0",
        address: str | None = None,
        network: str = "dnntrain-endpoints",
        startup_timeout: float = 180,
    ) -> None:
        super().__init__(host="0.0.0.0", port=port, startup_timeout=startup_timeout, build_environments=False)
        self.docker_url, self.image, self.python_path = docker_url, image, python
        self.publish_host, self.address, self.network = publish_host, address, network
        self._serving = ""  # the endpoint being deployed to, whose container the agent's checks run in

    @property
    def python(self) -> str:
        return self.python_path

    def environments_root(self) -> str:
        return f"{ROOT}/.environments"  # not built here (build_environments=False)

    def folder_path(self, endpoint: str) -> str:
        return f"{ROOT}/{checked_endpoint(endpoint)}"

    def public_address(self) -> str:
        if self.address:
            return self.address
        url = self.docker_url or ""
        return (
            url.split("://", 1)[1].rsplit(":", 1)[0] if url.startswith(("tcp://", "ssh://")) else "127.0.0.1"
        )

    @staticmethod
    def container_name(endpoint: str) -> str:
        return f"dnntrain-endpoint-{checked_endpoint(endpoint)}"

    # -- the endpoint's container ---------------------------------------------------------------------

    def _inspect(self, endpoint: str) -> dict | None:
        from docker.errors import NotFound

        try:
            return self.client.api.inspect_container(self.container_name(endpoint))
        except NotFound:
            return None

    def _ensure_supervisor(self, endpoint: str, key_hash: str) -> None:
        """The endpoint's container runs the supervisor with this key: made (again, on the same volume)
        when there is none or it has another key."""
        found = self._inspect(endpoint)
        folder = self.folder_path(endpoint)
        if found and found["State"]["Running"] and self._read_text(f"{folder}/key.sha256") == key_hash:
            return
        port = (
            int(found["Config"]["Labels"][PORT_LABEL])
            if found
            else self.port or free_port("0.0.0.0", taken=set())
        )
        if found:
            self.client.api.remove_container(found["Id"], force=True)
        container = self._create(endpoint, port)
        files = {f"{BIN}/{Path(m.__file__).name}": Path(m.__file__).read_bytes() for m in _SHIPPED}
        files[f"{folder}/endpoint.json"] = json.dumps({"host": "0.0.0.0", "port": port}).encode()
        files[f"{folder}/key.sha256"] = key_hash.encode()
        if not self._read_text(f"{folder}/desired.json"):
            files[f"{folder}/desired.json"] = json.dumps({"active": None, "slots": {}}).encode()
        files[f"{folder}/status.json"] = b"{}"  # not the last container's: this one's, once it has started
        put_files(self.client.api, container, files, mode=0o600)
        self.client.api.start(container)
        self._wait(endpoint, lambda status: "slots" in status, "the endpoint's supervisor to start")

    def _create(self, endpoint: str, port: int) -> str:
        from docker.errors import NotFound

        labels = {MANAGED_LABEL: "dnntrain", ENDPOINT_LABEL: endpoint, PORT_LABEL: str(port)}
        volume = self.container_name(endpoint)
        try:
            self.client.api.inspect_volume(volume)
        except NotFound:
            self.client.api.create_volume(volume, labels=labels)
        if not self.client.api.networks(names=[self.network]):
            self.client.api.create_network(self.network, driver="bridge", labels={MANAGED_LABEL: "dnntrain"})
        host_config = self.client.api.create_host_config(
            binds={volume: {"bind": ROOT, "mode": "rw"}}, port_bindings={port: (self.publish_host, port)},
            restart_policy={"Name": "unless-stopped"}, network_mode=self.network, init=True,
        )  # fmt: skip
        command = [self.python, f"{BIN}/endpoint_supervisor.py", self.folder_path(endpoint)]
        return self.client.api.create_container(
            self.image, command=command, name=self.container_name(endpoint), labels=labels,
            ports=[port], host_config=host_config, working_dir=ROOT,
        )["Id"]  # fmt: skip

    # -- what the shared part asks of a backend ------------------------------------------------------

    def start(self, endpoint: str, version, key_hash: str) -> str:
        self._ensure_supervisor(endpoint, key_hash)  # first: the agent's checks run in its container
        self._serving = endpoint
        return super().start(endpoint, version, key_hash)

    def locked(self, endpoint: str) -> contextlib.AbstractContextManager:
        name = f"{self.container_name(endpoint)}-lock"
        return daemon_lock(self.client, name, self.image, f"another deploy of endpoint {endpoint}")

    def _agent(self, command: str, *args: str):
        """The agent's command in the endpoint's container (the one a folder names, or the one being
        deployed to); ``running`` and ``reload`` of a container that does not run: None."""
        endpoint = _endpoint_of(args[0]) if command in ("running", "reload") else self._serving
        found = self._inspect(endpoint)
        if not (found and found["State"]["Running"]):
            if command in ("running", "reload"):
                return None
            raise ServingFailed(
                f"endpoint {endpoint}: its container {self.container_name(endpoint)} is not running"
            )
        argv = [self.python, "-I", f"{BIN}/endpoint_agent.py", command, *args]
        execution = self.client.api.exec_create(found["Id"], argv)["Id"]
        out, err = self.client.api.exec_start(execution, demux=True)
        if self.client.api.exec_inspect(execution)["ExitCode"] != 0:
            said = (err or out or b"").decode(errors="replace")[-2000:]
            raise ServingFailed(
                f"endpoint {endpoint}: {shlex.join(argv[3:])} failed in its container: {said}"
            )
        return json.loads(out)

    def _read_text(self, path: str) -> str | None:
        content = read_file(self.client.api, self.container_name(_endpoint_of(path)), path)
        return None if content is None else content.decode(errors="replace")

    def _write_text(self, path: str, text: str) -> None:
        put_files(self.client.api, self.container_name(_endpoint_of(path)), {path: text.encode()}, mode=0o600)

    def _upload(self, local: Path, path: str) -> None:
        """Into a folder of its own first, renamed into place whole."""
        container = self.container_name(_endpoint_of(path))
        if self._exists(container, path):
            return
        partial = f"{path}.{uuid.uuid4().hex[:8]}.partial"
        files = {
            f"{partial}/{f.relative_to(local).as_posix()}": f.read_bytes()
            for f in local.rglob("*")
            if f.is_file()
        }
        put_files(self.client.api, container, files)
        execution = self.client.api.exec_create(container, ["mv", "-T", partial, path])["Id"]
        self.client.api.exec_start(execution)
        if self.client.api.exec_inspect(execution)["ExitCode"] != 0:
            raise ServingFailed(f"{path}: the version's files could not be put in place in {container}")

    def _exists(self, container: str, path: str) -> bool:
        from docker.errors import NotFound

        try:
            self.client.api.get_archive(container, path)[0].close()
        except NotFound:
            return False
        return True

    @contextlib.contextmanager
    def reaching(self, endpoint: str, slot: str) -> Iterator[str]:
        port = self._running(endpoint)["slots"][slot]["port"]
        container = self.container_name(endpoint)
        with local_forward(lambda: ExecRelay(self.client.api, container, self.python, port)) as local:
            yield f"http://127.0.0.1:{local}"

    def undeploy(self, endpoint: str) -> bool:
        """The endpoint's container and volume removed (its servers with them)."""
        from docker.errors import NotFound

        found = self._inspect(endpoint)
        if found:
            self.client.api.remove_container(found["Id"], force=True)
        try:
            self.client.api.remove_volume(self.container_name(endpoint), force=True)
        except NotFound:
            return found is not None
        return True


class ExecRelay:
    """One connection to ``127.0.0.1:port`` of a container, carried by an exec'd relay (:data:`RELAY`)
    over the daemon's connection: socket-like for :func:`..common.tunnels.local_forward`."""

    def __init__(self, api, container: str, python: str, port: int) -> None:
        execution = api.exec_create(container, [python, "-c", RELAY, str(port)], stdin=True)["Id"]
        self._raw = api.exec_start(execution, socket=True)._sock
        self._pending = b""

    def recv(self, size: int) -> bytes:
        """The relay's output, its stream frames (8-byte headers: stream, size) taken off."""
        while not self._pending:
            header = self._exactly(8)
            if len(header) < 8:
                return b""
            self._pending = self._exactly(int.from_bytes(header[4:], "big"))
        data, self._pending = self._pending[:size], self._pending[size:]
        return data

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count and (chunk := self._raw.recv(count - len(data))):
            data += chunk
        return data

    def sendall(self, data: bytes) -> None:
        self._raw.sendall(data)

    def shutdown(self, how: int) -> None:
        self._raw.shutdown(how)

    def close(self) -> None:
        self._raw.close()


def _endpoint_of(path: str) -> str:
    """The endpoint whose folder ``path`` is in (``/endpoint/<endpoint>/...``)."""
    return path.split("/")[2]


def _files(folder: Path) -> list[Path]:
    return [path for path in sorted(folder.rglob("*")) if path.is_file()]
