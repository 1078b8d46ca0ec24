"""Real Airflow for every test: a temporary AIRFLOW_HOME with a fresh SQLite metadata DB.

The environment must be set before anything imports airflow, hence module level.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
AIRFLOW_HOME = Path(tempfile.mkdtemp(prefix="dnntrain-airflow-home-"))
os.environ.update(
    {
        "AIRFLOW_HOME": str(AIRFLOW_HOME),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{AIRFLOW_HOME / 'airflow.db'}",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }
)
os.environ.pop("MLFLOW_TRACKING_URI", None)
sys.path.insert(0, str(REPO / "tests"))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def airflow_db():
    from airflow.utils import db

    db.resetdb()
    yield AIRFLOW_HOME


@pytest.fixture(scope="session")
def tiny_versions(airflow_db):
    """Versions of the model "tiny-served" by scale (2, 3 and 1): it predicts each row's sum times its
    scale, which is also its run's metric "score". Trained and registered once, through a DAG, for the
    deployment tests of every backend."""
    from airflow_helpers import TEST_DAGS, load_dag, xcom

    registered = {}
    for scale in (2.0, 3.0, 1.0):
        dag_run = load_dag(TEST_DAGS, "dnntrain_test_train_tiny").test(run_conf={"scale": scale})
        assert dag_run.state == "success"
        registered[scale] = xcom(dag_run, "register")
    return registered


@pytest.fixture(scope="session")
def docker_daemon():
    """One real Docker daemon for every test that runs containers, with the images ``make env`` built."""
    from docker_daemon import TORCH_IMAGE, DockerDaemon

    with DockerDaemon() as started:
        assert started.has_image(TORCH_IMAGE), "no test image: run `python tests/docker_daemon.py images`"
        yield started


@pytest.fixture(scope="session")
def docker_registry():
    """One real image registry (with credentials) for every test that pushes or pulls images."""
    from docker_registry import LocalRegistry

    with LocalRegistry() as started:
        yield started


@pytest.fixture
def registry_connection(docker_registry, monkeypatch):
    """An Airflow docker connection (the docker provider's kind) to the test registry: its id."""
    from airflow.sdk import Connection

    connection = Connection(
        conn_id="registry", conn_type="docker", host=docker_registry.address,
        login=docker_registry.username, password=docker_registry.password,
    )  # fmt: skip
    monkeypatch.setenv("AIRFLOW_CONN_REGISTRY", connection.as_json())
    return "registry"


@pytest.fixture(autouse=True)
def _no_tracking_uri_left_behind():
    """Processes started later (the real-Airflow suites' components and their tasks) inherit this
    process's environment: a test that leaves MLFLOW_TRACKING_URI there (``mlflow.set_tracking_uri``
    does) sends their runs to another store. Cleaned up, and the test fails naming it."""
    yield
    left = {
        name: os.environ.pop(name)
        for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
        if name in os.environ
    }
    assert not left, f"the test left {left} in the environment"


# Fixtures of one machine-wide resource: every test that uses one runs on the same xdist worker.
SHARED_BY_GROUP = {"docker": {"docker_daemon", "docker_registry"}}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config, items):
    """``make test`` runs two workers (``-n 2 --dist loadgroup``): most tests wait on processes, so two
    at a time fill the cores. A module's tests stay on one worker, so that its module-scoped fixtures
    (SSH hosts, a fake cluster) start once; the Docker daemon's tests all go to one, since its data
    root is one directory."""
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        shared = [group for group, fixtures in SHARED_BY_GROUP.items() if fixtures & set(item.fixturenames)]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::")[0]))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)
