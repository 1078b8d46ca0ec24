"""Opt-in: the Kubernetes launcher on a real cluster (``pytest -m kubernetes_cluster``, with KUBECONFIG
naming it; not part of ``make test``). The cluster must have the training images (``make images``, then
for kind: ``kind load docker-image dnntrain-torch:cpu dnntrain-tensorflow:cpu``). DDP and a parameter-server
job train for real in pods; afterwards no object of theirs is left. README: "Kubernetes"."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import pytest

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
from airflow_provider_dnntrain.spec import ParameterServer, TorchDistributed, TrainingJob

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
pytestmark = pytest.mark.kubernetes_cluster


@pytest.fixture(scope="module")
def kubeconfig() -> str:
    path = os.environ.get("KUBECONFIG")
    if not path:
        pytest.fail("the kubernetes_cluster suite runs against the cluster KUBECONFIG names: set it")
    return path


@pytest.fixture
def launcher(kubeconfig, tmp_path):
    namespace = os.environ.get("DNNTRAIN_TEST_NAMESPACE", "default")
    return KubernetesLauncher(
        kubernetes_conn_id=None,
        config_file=kubeconfig,
        namespace=namespace,
        image_pull_policy="IfNotPresent",
        work_root=str(tmp_path),
        startup_timeout_seconds=300,
    )


def train(launcher: KubernetesLauncher, job: TrainingJob, name: str):
    run_id = f"{name}-{int(time.time())}"
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=900)
    print("\n".join(map(str, lines)))
    outputs = launcher.collect_outputs(handle) / "outputs"
    left = launcher.core.list_namespaced_pod(handle.namespace, label_selector=handle.selector)
    assert left.items == []
    return lines, outputs


def test_ddp_trains_across_two_pods(launcher):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )
    lines, outputs = train(launcher, job, "cluster-ddp")
    ranks = {
        re.search(r"rank=(\d) world_size=2", line.text).group(1)
        for line in lines
        if "world_size=2" in line.text
    }
    assert ranks == {"0", "1"}
    assert json.loads((outputs / "summary.json").read_text())["allreduce_sum"] == 3.0


def test_parameter_server_job_trains(launcher):
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="tf_parameter_server_digits.py",
        arguments=["--epochs", "2"],
        distribution=ParameterServer(worker_count=1, parameter_server_count=1, chief=True),
        environment={"variables": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
    )
    _, outputs = train(launcher, job, "cluster-ps")
    facts = json.loads((outputs / "summary.json").read_text())
    assert facts["losses"][-1] < facts["losses"][0]
