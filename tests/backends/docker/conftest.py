"""A launcher on the session's Docker daemon (``docker_daemon`` in tests/conftest.py) whose runs' files
are the test's."""

from __future__ import annotations

import pytest
from docker_daemon import TORCH_IMAGE


@pytest.fixture
def daemon(docker_daemon):
    return docker_daemon


@pytest.fixture
def launcher(daemon, tmp_path):
    from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher

    # The torch image for every job: it is the one built for the tests, and the stand-in scripts need
    # no framework.
    return DockerLauncher(
        docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=str(tmp_path / "runs"), stop_grace_seconds=5
    )
