"""The Kubernetes launcher against a fake cluster over real HTTP (tests/fake_kubernetes): its pods run
as real processes in network namespaces of their own, and find each other by the Service's names."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from azure_script import assert_ran_as_azure_ml_script_offline
from fake_kubernetes import assert_nothing_left, fake_launcher
from launcher_jobs import rank_lines, wait_in_background, wait_until_ready
from launcher_jobs import run_job as run

from airflow_provider_dnntrain.backends.base import JobFailed, JobState
from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
from airflow_provider_dnntrain.spec import (
    Horovod,
    Input,
    MultiWorkerMirrored,
    ParameterServer,
    TorchDistributed,
    TrainingJob,
)

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture
def launcher(cluster, monkeypatch, tmp_path):
    return fake_launcher(cluster, monkeypatch, tmp_path)


@pytest.mark.slow
def test_ddp_trains_across_two_pods(cluster, launcher):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )
    handle, lines = run(launcher, job, "k8s-ddp")
    text = {n: "\n".join(line.text for line in lines if line.replica == n) for n in ("node-0", "node-1")}
    ranks = {name: re.search(r"rank=(\d) world_size=2", t).group(1) for name, t in text.items()}
    assert sorted(ranks.values()) == ["0", "1"]
    checksums = {name: re.search(r"weights_checksum=(\S+)", t).group(1) for name, t in text.items()}
    assert checksums["node-0"] == checksums["node-1"]
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["allreduce_sum"] == 3.0
    assert_nothing_left(cluster)


@pytest.mark.slow
@pytest.mark.parametrize(
    "dist",
    [{"runner": "mpirun", "controller": "mpi"}, {"controller": "gloo"}],
    ids=["mpirun", "horovodrun-gloo"],
)
def test_horovod_reaches_the_other_pods_sshd_and_allreduces(cluster, launcher, dist):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "2"],
        distribution=Horovod(node_count=2, network_interface="eth0", **dist),
    )
    handle, lines = run(launcher, job, "k8s-hvd")
    for rank, pod in ((0, "k8s-hvd-node-0"), (1, "k8s-hvd-node-1")):  # node 0 is filled first
        mine = rank_lines(lines, rank)
        assert f"rank={rank} size=2" in mine and "allreduce_sum=3.0" in mine
        assert f"host={pod}" in mine
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_failing_replica_fails_the_job_naming_it(cluster, launcher):
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--fail", "worker-1:3", "--serve", "ps-0", "--serve", "chief-0", "--serve", "worker-0"],
        distribution=ParameterServer(worker_count=2, parameter_server_count=1),
    )
    began = time.monotonic()
    with pytest.raises(JobFailed) as failure:
        run(launcher, job, "k8s-fail")
    print(failure.value)
    assert failure.value.status.failed_replica == "worker-1"
    assert failure.value.status.exit_code == 3
    assert "replica worker-1 failed with exit code 3" in str(failure.value)
    assert time.monotonic() - began < 60
    assert_nothing_left(cluster)


def serving_job(**fields) -> TrainingJob:
    """Two workers that print "ready" and run until stopped."""
    fields.setdefault("distribution", MultiWorkerMirrored(worker_count=2))
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--serve", "worker-0", "--serve", "worker-1"],
        **fields,
    )


@pytest.mark.slow
def test_an_evicted_pod_fails_the_job_fast_with_the_reason(cluster, launcher):
    job = serving_job()
    handle = launcher.submit(job, launcher.plan(job, "k8s-evicted"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, 2)
    evicted = time.monotonic()
    cluster.evict("k8s-evicted-worker-1")
    thread.join(60)
    error = outcome["error"]
    assert isinstance(error, JobFailed) and error.status.failed_replica == "worker-1"
    assert "Evicted: The node was low on resource: memory" in str(error)
    assert time.monotonic() - evicted < 20
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_an_image_that_cannot_be_pulled_fails_the_job_naming_it(cluster, launcher):
    job = serving_job(environment={"image": "registry.invalid/team/missing:1"})
    began = time.monotonic()
    with pytest.raises(JobFailed) as failure:
        run(launcher, job, "k8s-no-image")
    message = str(failure.value)
    assert "replica worker-0 (pod k8s-no-image-worker-0) cannot start: ErrImagePull" in message
    assert "registry.invalid/team/missing:1" in message
    assert time.monotonic() - began < 30  # not the startup timeout: the image is missing
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_pod_no_node_can_take_fails_after_the_startup_timeout(cluster, launcher):
    # No gang scheduler holds it, no scale-up is under way (no TriggeredScaleUp event): not queued, stuck.
    launcher.startup_timeout_seconds = 3
    job = serving_job(resources={"use_gpu": True})  # the fake node has no GPU
    with pytest.raises(JobFailed) as failure:
        run(launcher, job, "k8s-no-gpu")
    message = str(failure.value)
    assert "was not scheduled within 3 s" in message
    assert "Unschedulable: 0/1 nodes are available: 1 Insufficient nvidia.com/gpu." in message
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_cancel_deletes_the_run_in_one_request_and_the_cluster_removes_everything(cluster, launcher):
    job = serving_job(distribution=ParameterServer(worker_count=2, parameter_server_count=1))
    job = job.model_copy(
        update={"arguments": ["--serve", "chief-0", "--serve", "ps-0", "--serve", "worker-0"]}
    )
    handle = launcher.submit(job, launcher.plan(job, "k8s-cancel"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, 4)
    before = cluster.requests().get("DELETE configmaps", 0)
    launcher.cancel(handle)  # what on_kill does: returns at once
    assert launcher.poll(handle).state is JobState.CANCELLED
    assert_nothing_left(cluster)
    assert cluster.requests()["DELETE configmaps"] >= before + 1
    thread.join(60)
    assert isinstance(outcome.get("error"), JobFailed)


@pytest.mark.slow
def test_a_64_replica_job_costs_one_api_request_per_wait_interval(cluster, launcher, tmp_path):
    replicas = 64
    measured = tmp_path / "measured"  # the replicas end once it exists (the fake's pods see this disk)
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--sleep", "60", "--until", str(measured)],  # past 64 pods' start, to the measure
        distribution=MultiWorkerMirrored(worker_count=replicas),
    )
    submitted, at_submit = time.monotonic(), cluster.requests()
    handle = launcher.submit(job, launcher.plan(job, "k8s-wide"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, replicas, timeout=180)
    print(f"{replicas} replicas ready {time.monotonic() - submitted:.1f} s after submit")
    before, began = cluster.requests(), time.monotonic()
    time.sleep(3)
    after, ended = cluster.requests(), time.monotonic()
    measured.touch()
    thread.join(120)
    assert "status" in outcome, outcome
    made = {key: after[key] - before.get(key, 0) for key in after if after[key] != before.get(key, 0)}
    intervals = (ended - began) / launcher.poll_interval
    print(f"{made} in {intervals:.1f} intervals")
    # One list of the run's pods per interval, and the log cursors saved now and then; the logs come
    # on streams opened once per pod.
    assert set(made) <= {"GET pods", "PATCH configmaps"}
    assert made["GET pods"] <= intervals + 1 and made.get("PATCH configmaps", 0) <= 1
    streams = after["GET pods/log"] - at_submit.get("GET pods/log", 0)
    assert streams <= replicas + 8  # one stream per pod (a few opened again at most)
    assert sorted({line.replica for line in lines}) == sorted(f"worker-{i}" for i in range(replicas))
    assert_nothing_left(cluster)


def fetching_launcher(launcher: KubernetesLauncher, command: str) -> KubernetesLauncher:
    """The launcher's settings, plus an init step that runs ``command`` with a volume at /data that
    every replica mounts too (as a step fetching a data set from object storage would)."""
    data = {"name": "data", "mountPath": "/data"}
    return KubernetesLauncher(
        kubernetes_conn_id=launcher.kubernetes_conn_id,
        work_root=str(launcher.work_root),
        poll_interval=launcher.poll_interval,
        stop_grace_seconds=launcher.stop_grace_seconds,
        volumes=[{"name": "data", "emptyDir": {}}],
        volume_mounts=[data],
        init_containers=[
            {
                "name": "fetch",
                "image": "dnntrain-torch:cpu",
                "command": ["python", "-c", command],
                "volumeMounts": [data],
            }
        ],
    )


def reading_job(source: Path) -> TrainingJob:
    (source / "read.py").write_text(
        "import os, sys\n"
        "path = sys.argv[sys.argv.index('--data') + 1]\n"
        "print('read', open(path).read(), 'via', os.environ['DNNTRAIN_INPUT_DIGITS'])\n"
    )
    return TrainingJob(
        framework="pytorch",
        source_directory=str(source),
        entry_script="read.py",
        inputs=[Input(name="digits", path="/data/digits.csv", argument="--data")],
    )


@pytest.mark.slow
def test_an_init_step_fetches_an_input_into_a_volume_the_replica_reads(cluster, launcher, tmp_path):
    fetch = "open('/data/digits.csv', 'w').write('0,1,2')"
    _, lines = run(fetching_launcher(launcher, fetch), reading_job(tmp_path), "k8s-input")
    assert "read 0,1,2 via /data/digits.csv" in [line.text for line in lines]
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_failing_init_step_fails_the_job_naming_it(cluster, launcher, tmp_path):
    with pytest.raises(JobFailed) as failure:
        run(fetching_launcher(launcher, "raise SystemExit(7)"), reading_job(tmp_path), "k8s-no-input")
    assert "replica worker-0 (pod k8s-no-input-worker-0) failed before it ran: init container fetch" in str(
        failure.value
    )
    assert "exited with code 7" in str(failure.value)
    assert_nothing_left(cluster)


def test_the_kubeflow_form_on_a_cluster_without_the_training_operator_says_so(cluster, monkeypatch, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", cluster.airflow_connection())
    launcher = KubernetesLauncher(
        kubernetes_conn_id="kubernetes_fake", kubeflow=True, work_root=str(tmp_path)
    )
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        distribution=TorchDistributed(node_count=2),
    )
    with pytest.raises(
        RuntimeError, match="^kubeflow: the cluster serves no PyTorchJob .* install the Kubeflow"
    ):
        launcher.submit(job, launcher.plan(job, "no-operator"), extra_env={})
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_a_script_written_for_azure_ml_finds_its_run_in_the_pod(cluster, launcher):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="azure_style.py",
        azureml_compat=True,
    )
    handle, lines = run(launcher, job, "k8s-azure")
    assert_ran_as_azure_ml_script_offline(lines)
    assert_nothing_left(cluster)
