"""Environments built into images - Azure ML's "Preparing" stage: a job's ``pip_packages`` and
requirements file installed on top of its base image (the environment's ``image``, else the project's
training image), as ``[<registry>/]dnntrain-env:<key>``.

The key is hashed from what the image holds (the base's name, the interpreter, the packages, the
requirements), so the tag is known before anything is built - a plan, a preview and every replica name
the same image. An image is used again as long as it was built on the base image as it is now (its
id, kept in a label): a base rebuilt under the same name builds the environment again.

Built once per key on a daemon: a builder holds the daemon's lock of the key (``docker_lock.py``) while
it builds; the others wait, then find the image. A lock whose builder died is taken over. ``docker
build`` tags an image only once every step has succeeded, so a half-built one is never used; a failed
build raises with the installer's own last lines. With a registry, the image is pushed once built, and
a run on another daemon pulls it instead of building.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import re
import shlex
from dataclasses import dataclass, field

from airflow_provider_dnntrain.backends.common.docker_client import docker_client
from airflow_provider_dnntrain.backends.common.docker_files import read_file, tar_of
from airflow_provider_dnntrain.backends.common.docker_lock import daemon_lock
from airflow_provider_dnntrain.backends.common.environments import EnvironmentBuildFailed, requirements_of
from airflow_provider_dnntrain.spec import TrainingJob

log = logging.getLogger(__name__)

REPOSITORY = "dnntrain-env"
IMAGE_REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:@-]*")
BASE_ID_LABEL = "dnntrain.io/base-image-id"
KEY_LABEL = "dnntrain.io/environment"
FOLDER = "/opt/dnntrain-environment"  # in the image: requirements.txt and freeze.txt


@dataclass(frozen=True)
class Registry:
    """Where environment images are pushed and pulled: ``address`` is ``host[:port][/namespace]``."""

    address: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def host(self) -> str:
        return self.address.split("/")[0]

    @property
    def auth_config(self) -> dict | None:
        if not self.username:
            return None
        return {"username": self.username, "password": self.password or "", "serveraddress": self.host}

    def docker_config_json(self) -> str:
        """The credentials as a ``kubernetes.io/dockerconfigjson`` pull Secret holds them."""
        auth = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
        return json.dumps(
            {"auths": {self.host: {"username": self.username, "password": self.password or "", "auth": auth}}}
        )

    @classmethod
    def from_connection(cls, conn_id: str) -> Registry:
        """An Airflow docker connection (the docker provider's): host[:port] is the registry, login and
        password its credentials."""
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(conn_id)
        if not conn.host:
            raise ValueError(f"docker_conn_id: connection {conn_id!r} names no registry (its host)")
        host = conn.host.split("://")[-1].rstrip("/")
        address = f"{host}:{conn.port}" if conn.port and ":" not in host.split("/")[0] else host
        return cls(address, conn.login or None, conn.password or None)


@dataclass(frozen=True)
class ImageBuilding:
    """Where a launcher's environment images are built (the daemon at ``docker_url``, default the
    environment's) and pushed (``image_registry``, or the registry of the docker connection
    ``docker_conn_id``; neither: kept on the daemon)."""

    docker_url: str | None = None
    image_registry: str | None = None
    docker_conn_id: str | None = None

    @classmethod
    def pushing(cls, docker_url: str | None, image_registry: str | None, docker_conn_id: str | None):
        """Building that pushes to a registry, or None without one (what a cluster's nodes pull from)."""
        return cls(docker_url, image_registry, docker_conn_id) if image_registry or docker_conn_id else None

    def registry(self) -> Registry | None:
        if self.docker_conn_id:
            return Registry.from_connection(self.docker_conn_id)
        return Registry(self.image_registry) if self.image_registry else None

    def client(self):
        return docker_client(self.docker_url)

    def tag(self, job: TrainingJob, base: str, python: str) -> str:
        return environment_tag(job, base, python, self.registry())

    def ensure(self, job: TrainingJob, base: str, python: str, client=None) -> BuiltImage:
        built = EnvironmentImages(client or self.client(), self.registry(), python).ensure(job, base)
        log.info("Environment image %s (%s)", built.tag, "built" if built.built else "cached")
        return built


def environment_tag(job: TrainingJob, base: str, python: str, registry: Registry | None) -> str:
    """The job's environment image, ``[<registry>/]dnntrain-env:<key>`` (pure)."""
    content = {
        "base": base,
        "python": python,
        "packages": sorted(job.environment.pip_packages),
        "requirements": requirements_of(job),
    }
    key = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:20]
    return f"{registry.address}/{REPOSITORY}:{key}" if registry else f"{REPOSITORY}:{key}"


def check_reference(image: str) -> None:
    """``ValueError`` naming the field unless ``image`` is an image reference (it becomes a Dockerfile's
    ``FROM``: a value from ``dag_run.conf`` must not add steps)."""
    if not IMAGE_REFERENCE.fullmatch(image):
        raise ValueError(f"environment.image: {image!r} is not an image reference (such as 'repo/name:tag')")


def dockerfile(base: str, python: str) -> str:
    """Exec-form steps: no shell sees a package's name; the interpreter is quoted where one does."""
    install = [
        python,
        "-m",
        "pip",
        "install",
        "--no-cache-dir",
        "--requirement",
        f"{FOLDER}/requirements.txt",
    ]
    freeze = ["sh", "-c", f"{shlex.quote(python)} -m pip freeze > {FOLDER}/freeze.txt"]
    return "\n".join(
        [
            f"FROM {base}",
            f"COPY requirements.txt {FOLDER}/requirements.txt",
            f"RUN {json.dumps(install)}",
            f"RUN {json.dumps(freeze)}",
            "",
        ]
    )


@dataclass
class BuiltImage:
    tag: str
    built: bool  # False: found on the daemon or in the registry
    freeze: str  # the resolved package set (pip freeze)


class EnvironmentImages:
    """Build, find or pull jobs' environment images on a daemon (``client``, a ``docker.DockerClient``)."""

    def __init__(self, client, registry: Registry | None, python: str) -> None:
        self.client, self.registry, self.python = client, registry, python

    def ensure(self, job: TrainingJob, base: str) -> BuiltImage:
        check_reference(base)
        tag = environment_tag(job, base, self.python, self.registry)
        base_id = self._base_id(base)
        if self._usable(tag, base_id):
            return BuiltImage(tag, False, self._freeze(tag))
        name, waiting = f"dnntrain-build-{tag.rsplit(':', 1)[1]}", "another task building this environment"
        with daemon_lock(self.client, name, base, waiting):
            if self._usable(tag, base_id):  # built while this waited
                return BuiltImage(tag, False, self._freeze(tag))
            self._build(tag, base, self.python, requirements_text(job), base_id)
            if self.registry:
                self._push(tag)
        return BuiltImage(tag, True, self._freeze(tag))

    def _base_id(self, base: str) -> str:
        from docker.errors import ImageNotFound

        try:
            return self.client.api.inspect_image(base)["Id"]
        except ImageNotFound:
            log.info("Pulling the environment's base image %s", base)
            self._pull(base)
            return self.client.api.inspect_image(base)["Id"]

    def _usable(self, tag: str, base_id: str) -> bool:
        """The image is on the daemon, built on ``base_id``, and (with a registry) in the registry."""
        if self._built_on(tag) == base_id:
            if self.registry and not self._in_registry(tag):
                self._push(tag)
            return True
        if self.registry and self._in_registry(tag):
            self._pull(tag)
            return self._built_on(tag) == base_id
        return False

    def _built_on(self, tag: str) -> str | None:
        from docker.errors import ImageNotFound

        try:
            labels = self.client.api.inspect_image(tag)["Config"].get("Labels") or {}
        except ImageNotFound:
            return None
        return labels.get(BASE_ID_LABEL)

    def _in_registry(self, tag: str) -> bool:
        from docker.errors import APIError

        try:
            self.client.api.inspect_distribution(tag, auth_config=self._auth(tag))
        except APIError as error:
            if error.status_code in (401, 403, 404) or "manifest unknown" in str(error):
                return False
            raise
        return True

    def _auth(self, image: str) -> dict | None:
        if self.registry and image.startswith(f"{self.registry.host}/"):
            return self.registry.auth_config
        return None

    def _pull(self, image: str) -> None:
        repository, _, tag = image.rpartition(":") if ":" in image.split("/")[-1] else (image, "", "latest")
        for chunk in self.client.api.pull(
            repository, tag=tag, stream=True, decode=True, auth_config=self._auth(image)
        ):
            _raise_on_error(chunk, f"pulling {image}")

    def _build(self, tag: str, base: str, python: str, requirements: str, base_id: str) -> None:
        log.info("Building environment image %s on %s", tag, base)
        context = _context({"Dockerfile": dockerfile(base, python), "requirements.txt": requirements})
        labels = {BASE_ID_LABEL: base_id, KEY_LABEL: tag.rsplit(":", 1)[1]}
        said: list[str] = []
        chunks = self.client.api.build(
            fileobj=context, custom_context=True, tag=tag, labels=labels, network_mode="host",
            rm=True, forcerm=True, pull=False, decode=True,
        )  # fmt: skip
        for chunk in chunks:
            for line in filter(str.strip, chunk.get("stream", "").splitlines()):
                said.append(line)
                log.info("[build] %s", line)
            if "error" in chunk:
                tail = "\n".join(said[-40:])
                raise EnvironmentBuildFailed(
                    f"environment.pip_packages: building {tag} on {base} failed: {chunk['error'].strip()}"
                    f"\n{tail}"
                )

    def _push(self, tag: str) -> None:
        log.info("Pushing %s", tag)
        repository, _, version = tag.rpartition(":")
        for chunk in self.client.api.push(
            repository, tag=version, stream=True, decode=True, auth_config=self._auth(tag)
        ):
            _raise_on_error(chunk, f"pushing {tag}")

    def _freeze(self, tag: str) -> str:
        container = self.client.api.create_container(tag, command=["true"])["Id"]
        try:
            return (read_file(self.client.api, container, f"{FOLDER}/freeze.txt") or b"").decode()
        finally:
            self.client.api.remove_container(container, force=True)


def requirements_text(job: TrainingJob) -> str:
    """What the image installs: the job's ``pip_packages``, then its requirements file's lines."""
    return "".join(f"{item}\n" for item in job.environment.pip_packages) + requirements_of(job)


def _context(files: dict[str, str]) -> io.BytesIO:
    return io.BytesIO(tar_of({name: text.encode() for name, text in files.items()}))


def _raise_on_error(chunk: dict, doing: str) -> None:
    if "error" in chunk:
        raise EnvironmentBuildFailed(f"environment: {doing} failed: {chunk['error'].strip()}")
