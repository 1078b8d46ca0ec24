"""The Kubernetes launcher's Kubeflow form against the fake cluster running a fake Kubeflow training
operator (tests/fake_kubernetes/fake_training_operator.py): the launcher creates a TFJob / PyTorchJob /
MPIJob, the operator makes its pods (and Services, or its kubectl-exec plumbing) with its own variables,
and the replicas train for real."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from fake_kubernetes import FakeCluster, assert_nothing_left, fake_launcher
from launcher_jobs import rank_lines, wait_in_background, wait_until_ready
from launcher_jobs import run_job as run

from airflow_provider_dnntrain.backends.base import JobFailed, JobState, wait_for_job
from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
from airflow_provider_dnntrain.spec import (
    Horovod,
    MultiWorkerMirrored,
    ParameterServer,
    TorchDistributed,
    TrainingJob,
)

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
KUBEFLOW = "kubeflow.org/v1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    root = tmp_path_factory.mktemp("kubeflow") / "cluster"
    with FakeCluster(root, training_operator="run") as started:
        yield started


@pytest.fixture
def launcher(cluster, monkeypatch, tmp_path):
    return fake_launcher(cluster, monkeypatch, tmp_path, kubeflow=True)


@pytest.mark.slow
def test_ddp_trains_as_a_pytorchjob(cluster, launcher):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )
    handle, lines = run(launcher, job, "kf-ddp")
    text = {n: "\n".join(line.text for line in lines if line.replica == n) for n in ("node-0", "node-1")}
    ranks = {name: re.search(r"rank=(\d) world_size=2", t).group(1) for name, t in text.items()}
    assert ranks == {"node-0": "0", "node-1": "1"}
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["allreduce_sum"] == 3.0
    assert_nothing_left(cluster)


def replica_job(framework: str, distribution, *arguments: str) -> TrainingJob:
    return TrainingJob(
        framework=framework,
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=list(arguments),
        distribution=distribution,
    )


@pytest.mark.slow
def test_each_replica_runs_with_the_operators_tf_config_and_the_plans_variables(cluster, launcher):
    job = replica_job(
        "tensorflow",
        ParameterServer(worker_count=2, parameter_server_count=1),
        *("--bind", "--print-env", "TF_CONFIG", "--print-env", "DNNTRAIN_ROLE", "--serve", "ps-0"),
    )
    handle, lines = run(launcher, job, "kf-env")
    texts = [line.text for line in lines]
    configs = {
        line.replica: json.loads(line.text.split("TF_CONFIG=", 1)[1])
        for line in lines
        if "TF_CONFIG=" in line.text
    }
    assert set(configs) == {"chief-0", "ps-0", "worker-0", "worker-1"}
    for replica, config in configs.items():
        role, index = replica.split("-")
        assert config["task"] == {"type": role, "index": int(index)}  # the operator's, for this pod
        assert config["cluster"]["worker"] == [f"kf-env-worker-{i}.training.svc:2222" for i in range(2)]
        # the plan's own variables, and the address the operator gave resolves to the pod itself
        assert f"{replica} DNNTRAIN_ROLE={role}" in texts
        assert f"{replica} listening on kf-env-{role}-{index}.training.svc:2222" in texts
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_torchrun_nodes_get_the_operators_node_rank(cluster, launcher):
    job = replica_job(
        "pytorch",
        TorchDistributed(node_count=2, process_count_per_node=1),
        *("--print-env", "PET_NODE_RANK", "--print-env", "PET_NNODES", "--print-env", "MASTER_ADDR"),
    )
    handle, lines = run(launcher, job, "kf-torch")
    for node in (0, 1):
        text = "\n".join(line.text for line in lines if line.replica == f"node-{node}")
        assert f"PET_NODE_RANK={node}" in text and "PET_NNODES=2" in text
        assert "MASTER_ADDR=kf-torch-master-0" in text
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_failing_worker_fails_the_job_naming_it(cluster, launcher):
    job = replica_job(
        "tensorflow",
        ParameterServer(worker_count=2, parameter_server_count=1),
        *("--fail", "worker-1:3", "--serve", "ps-0", "--serve", "chief-0", "--serve", "worker-0"),
    )
    with pytest.raises(JobFailed) as failure:
        run(launcher, job, "kf-fail")
    assert failure.value.status.failed_replica == "worker-1"
    assert failure.value.status.exit_code == 3
    assert "replica worker-1 failed with exit code 3" in str(failure.value)
    assert "worker-1 about to fail" in failure.value.status.last_lines
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_the_operators_verdict_fails_the_job(cluster, launcher):
    job = replica_job(
        "tensorflow", MultiWorkerMirrored(worker_count=2), "--serve", "worker-0", "--serve", "worker-1"
    )
    handle = launcher.submit(job, launcher.plan(job, "kf-verdict"), extra_env={})
    path = f"/apis/{KUBEFLOW}/namespaces/training/tfjobs/kf-verdict"
    wait_until(lambda: any(c["type"] == "Running" for c in cluster.api(path)["status"]["conditions"]))
    failed = {"type": "Failed", "status": "True", "reason": "DeadlineExceeded", "message": "ran too long"}
    conditions = cluster.api(path)["status"]["conditions"]
    cluster.patch(path, {"status": {"conditions": [*conditions, failed]}})
    with pytest.raises(JobFailed, match="the training operator failed it: DeadlineExceeded: ran too long"):
        wait_for_job(launcher, handle, lambda line: None, timeout=60)
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_cancelled_job_leaves_nothing_and_is_not_made_again(cluster, launcher):
    job = replica_job("pytorch", TorchDistributed(node_count=2), "--serve", "node-0", "--serve", "node-1")
    handle = launcher.submit(job, launcher.plan(job, "kf-cancel"), extra_env={})
    wait_until(lambda: len(cluster.pod_processes()) >= 4)
    launcher.cancel(handle)
    assert_nothing_left(cluster)
    time.sleep(1)  # the operator's next rounds would have made them again by now
    assert cluster.objects("pods") == []


@pytest.mark.slow
def test_a_retry_reattaches_to_the_same_job(cluster, launcher):
    job = replica_job("tensorflow", MultiWorkerMirrored(worker_count=2), "--lines", "3", "--sleep", "3")
    before = cluster.requests().get("POST tfjobs", 0)
    handle = launcher.submit(job, launcher.plan(job, "kf-again"), extra_env={})
    wait_until(lambda: len(cluster.objects("pods")) == 2)
    state = launcher.state(handle)
    taken = launcher.reattach(state, job, extra_env={})
    lines = []
    assert wait_for_job(launcher, taken, lines.append, timeout=120).state is JobState.SUCCEEDED
    assert cluster.requests()["POST tfjobs"] == before + 1
    assert {"worker-0", "worker-1"} <= {line.replica for line in lines}
    launcher.stop(handle, grace_seconds=1)
    assert_nothing_left(cluster)


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (KeyError, OSError):
            pass
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def crd_only_cluster(tmp_path_factory):
    with FakeCluster(tmp_path_factory.mktemp("kubeflow-crd") / "cluster", training_operator="crd") as started:
        yield started


@pytest.mark.slow
def test_with_no_operator_running_the_job_fails_at_the_startup_timeout(
    crd_only_cluster, monkeypatch, tmp_path
):
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", crd_only_cluster.airflow_connection())
    launcher = KubernetesLauncher(
        kubernetes_conn_id="kubernetes_fake",
        kubeflow=True,
        work_root=str(tmp_path),
        startup_timeout_seconds=3,
    )
    job = replica_job("pytorch", TorchDistributed(node_count=2))
    with pytest.raises(
        JobFailed,
        match=r"replica node-0 \(pod kf-down-master-0\) was not created by the training operator within 3 s",
    ):
        run(launcher, job, "kf-down")
    assert_nothing_left(crd_only_cluster)


@pytest.mark.slow
def test_a_job_deleted_from_outside_fails_the_run(cluster, launcher):
    job = replica_job(
        "tensorflow", MultiWorkerMirrored(worker_count=2), "--serve", "worker-0", "--serve", "worker-1"
    )
    handle = launcher.submit(job, launcher.plan(job, "kf-gone"), extra_env={})
    wait_until(lambda: len(cluster.pod_processes()) >= 4)
    cluster.api(f"/apis/{KUBEFLOW}/namespaces/training/tfjobs/kf-gone", method="DELETE")
    with pytest.raises(JobFailed, match="kf-gone"):
        wait_for_job(launcher, handle, lambda line: None, timeout=60)
    assert_nothing_left(cluster)


def mpi_job(script: str, *arguments: str, source=TEST_SCRIPTS, **distribution) -> TrainingJob:
    return TrainingJob(
        framework="pytorch",
        source_directory=str(source),
        entry_script=script,
        arguments=list(arguments),
        distribution=Horovod(
            node_count=2, runner="mpirun", controller="mpi", network_interface="eth0", **distribution
        ),
    )


@pytest.mark.slow
def test_horovod_trains_as_an_mpijob_its_ranks_started_through_kubectl_exec(cluster, launcher):
    job = mpi_job("torch_horovod_digits.py", "--epochs", "2", source=EXAMPLE_SCRIPTS)
    execs_before = cluster.requests().get("GET pods/exec", 0)
    handle, lines = run(launcher, job, "kf-hvd")
    for rank, pod in ((0, "kf-hvd-worker-0"), (1, "kf-hvd-worker-1")):  # the operator's hostfile order
        mine = rank_lines(lines, rank)
        assert f"rank={rank} size=2" in mine and "allreduce_sum=3.0" in mine
        assert f"host={pod}" in mine
    # the operator's rsh agent: one exec per worker for its Open MPI daemon, one more for the outputs
    # (both workers' agents trace to one stream at once: their words may interleave, not break)
    traced = " ".join(line.text for line in lines if line.replica == "launcher-0")
    assert "kf-hvd-worker-1" in traced and "--container base" in traced and "kubectl" in traced
    assert cluster.requests()["GET pods/exec"] - execs_before == 3
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_failing_rank_fails_the_mpijob_naming_its_launcher(cluster, launcher):
    job = mpi_job("replica.py", "--fail", "launcher-0:3")
    with pytest.raises(JobFailed) as failure:
        run(launcher, job, "kf-mpi-fail")
    assert failure.value.status.failed_replica == "launcher-0"
    assert failure.value.status.exit_code != 0
    assert "launcher-0 about to fail" in failure.value.status.last_lines
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_an_evicted_mpijob_worker_fails_the_job_and_its_ranks_are_stopped(cluster, launcher):
    job = mpi_job("replica.py", "--serve", "launcher-0")
    handle = launcher.submit(job, launcher.plan(job, "kf-mpi-evict"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, 2)  # both ranks run, each in its worker
    began = time.monotonic()
    cluster.evict("kf-mpi-evict-worker-1")
    thread.join(60)
    failure = outcome["error"]
    assert isinstance(failure, JobFailed)
    assert failure.status.failed_replica == "worker-1"
    assert "was stopped by Kubernetes: Evicted" in str(failure)
    assert time.monotonic() - began < 20
    assert_nothing_left(cluster)  # the ranks in the other worker, started through exec, too
