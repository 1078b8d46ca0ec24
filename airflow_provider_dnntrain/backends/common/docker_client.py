"""The Docker SDK's client of a daemon, for whatever talks to one (the Docker launcher and serving,
environment images)."""

from __future__ import annotations

from functools import cached_property


def docker_client(docker_url: str | None):
    """A client of the daemon at ``docker_url``, else the environment's (``DOCKER_HOST``, the socket)."""
    import docker

    return docker.DockerClient(base_url=docker_url) if docker_url else docker.from_env()


class OnDaemon:
    """Settings of a daemon's user (``docker_url``), and its client made on first use. An operator's
    copy (Airflow deep-copies operators) has the same settings and no client of its own yet."""

    docker_url: str | None = None

    @cached_property
    def client(self):
        return docker_client(self.docker_url)

    def __deepcopy__(self, memo):
        copied = object.__new__(type(self))
        copied.__dict__.update({k: v for k, v in self.__dict__.items() if k != "client"})
        return copied
