"""One fake cluster (tests/fake_kubernetes) for the Kubernetes backend's tests; a module that needs
the training operator makes its own."""

from __future__ import annotations

import pytest
from fake_kubernetes import FakeCluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    with FakeCluster(tmp_path_factory.mktemp("kubernetes") / "cluster") as started:
        yield started
