"""One fake cluster (tests/fake_kubernetes) for the Kubernetes backend's tests; a module that needs
the training operator makes its own."""

from __future__ import annotations

import pytest
from fake_kubernetes import FakeCluster


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    with FakeCluster(tmp_path_factory.mktemp("kubernetes") / "cluster") as started:
        yield started


@pytest.fixture(scope="module")
def connection(cluster):
    """The connection ``kubernetes_fake`` the test DAGs name, to this cluster."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", cluster.airflow_connection())
        yield
