"""A real image registry for the tests: Debian's ``docker-registry`` (the CNCF distribution registry),
started by PID on 127.0.0.1 with credentials (htpasswd): it refuses to be read or written without them.
A Docker daemon reaches it over plain HTTP (127.0.0.0/8 is an insecure registry by default); the fake
cluster's kubelet pulls from it with a pod's pull secret.

Its storage is kept between runs (``~/.cache/dnntrain/registry``), and ``make images-test`` pushes the
training image's layers there once (:func:`seed`), as a team's registry holds its base images: a test's
push of an environment image then sends only the environment's own layers."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import bcrypt

DATA_ROOT = Path.home() / ".cache" / "dnntrain" / "registry"
SEED_REPOSITORY = "dnntrain-env"  # where the environments' images go: their base's layers are there


def registry_binary() -> str:
    found = shutil.which("docker-registry") or shutil.which("docker-registry", path="/usr/bin:/usr/sbin")
    if not found:
        raise RuntimeError(
            "docker-registry is not installed (Debian's docker-registry: make env installs it)"
        )
    return found


@dataclass
class LocalRegistry:
    """``docker-registry`` by PID; ``address`` is ``127.0.0.1:<port>``."""

    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dnntrain-registry-")))
    username: str = "dnntrain"
    password: str = field(default_factory=lambda: secrets.token_urlsafe(16), repr=False)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_file(self) -> Path:
        return self.root / "registry.log"

    def start(self, timeout: float = 30) -> LocalRegistry:
        DATA_ROOT.mkdir(parents=True, exist_ok=True)
        self.port = _free_port()
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=5)).decode()
        (self.root / "htpasswd").write_text(f"{self.username}:{hashed.replace('$2b$', '$2y$', 1)}\n")
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}},
            "storage": {"filesystem": {"rootdirectory": str(DATA_ROOT)}, "delete": {"enabled": True}},
            "http": {"addr": self.address},
            "auth": {"htpasswd": {"realm": "dnntrain-tests", "path": str(self.root / "htpasswd")}},
        }
        (self.root / "config.yml").write_text(json.dumps(config))  # YAML reads JSON
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [registry_binary(), "serve", str(self.root / "config.yml")],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + timeout
        while self.status("/v2/", auth=False) != 401:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"docker-registry did not start: {self.log_file.read_text()[-2000:]}")
            time.sleep(0.1)
        return self

    def status(self, path: str, auth: bool = True, method: str = "GET") -> int | None:
        headers = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        if auth:
            headers["Authorization"] = (
                "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            )
        request = urllib.request.Request(f"http://{self.address}{path}", method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return None

    def has(self, image: str) -> bool:
        repository, _, tag = image.removeprefix(f"{self.address}/").rpartition(":")
        return self.status(f"/v2/{repository}/manifests/{tag}", method="HEAD") == 200

    def delete(self, image: str) -> None:
        """``image``'s manifest removed from the registry, if it is there."""
        repository, _, tag = image.removeprefix(f"{self.address}/").rpartition(":")
        request = self._request(f"/v2/{repository}/manifests/{tag}", "HEAD")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                digest = response.headers["Docker-Content-Digest"]
        except urllib.error.HTTPError:
            return
        with urllib.request.urlopen(
            self._request(f"/v2/{repository}/manifests/{digest}", "DELETE"), timeout=5
        ):
            pass

    def _request(self, path: str, method: str) -> urllib.request.Request:
        headers = {"Accept": "application/vnd.docker.distribution.manifest.v2+json"}
        headers["Authorization"] = (
            "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        )
        return urllib.request.Request(f"http://{self.address}{path}", method=method, headers=headers)

    @property
    def auth_config(self) -> dict:
        return {"username": self.username, "password": self.password, "serveraddress": self.address}

    def manifest_reads(self, image: str) -> int:
        """How many times ``image``'s manifest was read (pulls), from the access log."""
        repository, _, tag = image.removeprefix(f"{self.address}/").rpartition(":")
        wanted = f"/v2/{repository}/manifests/{tag} HTTP"
        return sum(
            1 for line in self.log_file.read_text().splitlines() if wanted in line and '" 200 ' in line
        )

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def seed(client, image: str) -> None:
    """``image``'s layers pushed once into the kept storage, under the environments' repository."""
    stamp = DATA_ROOT / f"seeded-{client.api.inspect_image(image)['Id'].split(':')[-1][:16]}"
    if stamp.exists():
        return
    with LocalRegistry() as registry:
        seeded = f"{registry.address}/{SEED_REPOSITORY}"
        client.api.tag(image, seeded, "base")
        try:
            for chunk in client.api.push(
                seeded, "base", stream=True, decode=True, auth_config=registry.auth_config
            ):
                if "error" in chunk:
                    raise RuntimeError(f"pushing {image} to the test registry: {chunk['error']}")
        finally:
            client.api.remove_image(f"{seeded}:base")
    stamp.touch()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
