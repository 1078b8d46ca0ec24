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


# `make test` runs two workers (pytest-xdist, `-n 2 --dist loadscope`): most tests wait on processes,
# servers and containers, so two at a time fill the cores. A module's tests run on one worker, in order,
# so that its module-scoped fixtures (SSH hosts, a fake cluster) start once; every test of the Docker
# daemon runs on the same worker, since the daemon's data root is one directory.
DOCKER_FIXTURES = {"docker_daemon", "docker_registry"}
DOCKER_MODULES = {"tests/backends/kubernetes/test_environment_images.py"}  # besides those named *docker*


def worker_scope(nodeid: str) -> str:
    """The tests that run on one worker, in order: a module's, or the Docker daemon's."""
    path = nodeid.split("::", 1)[0]
    return "docker" if "docker" in path or path in DOCKER_MODULES else path


def pytest_collection_modifyitems(config, items):
    """A test that uses the Docker daemon outside its scope would start a second daemon on the same
    data root, on another worker: refused when the tests are collected, however they are run."""
    using = [item.nodeid for item in items if DOCKER_FIXTURES & set(item.fixturenames)]
    misplaced = sorted({nodeid.split("::")[0] for nodeid in using if worker_scope(nodeid) != "docker"})
    if misplaced:
        raise pytest.UsageError(f"{misplaced} use the Docker daemon: list them in conftest.DOCKER_MODULES")


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook: without it installed, one process runs all
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadscope`` with :func:`worker_scope` as the scope (pytest-xdist's ``loadgroup`` marks
    do not reach its scheduler under pytest 9's node ids)."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByWorkerScope(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return worker_scope(nodeid)

    return ByWorkerScope(config, log)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(AIRFLOW_HOME, ignore_errors=True)
