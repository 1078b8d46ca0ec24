"""The Kubernetes launcher where a namespace limits memory and time: a LimitRange that defaults and
bounds every container, memory limits the node enforces (tests/fake_kubernetes/fake_limits.py: a
memory cgroup per container, OOMKilled past it), and pods that carry the task's time limit."""

from __future__ import annotations

import hashlib
import json
import tracemalloc

import pytest
from fake_kubernetes import assert_nothing_left, fake_launcher, ranks_job
from launcher_jobs import run_job as run

from airflow_provider_dnntrain.backends.base import JobFailed, wait_for_job
from airflow_provider_dnntrain.backends.kubernetes import settings as kubernetes_settings
from airflow_provider_dnntrain.backends.kubernetes.creation import CreationRefused

MiB = 1 << 20


@pytest.fixture
def launcher(cluster, monkeypatch, tmp_path):
    return fake_launcher(cluster, monkeypatch, tmp_path)


def test_200_mb_of_outputs_come_whole_through_a_limited_sidecar_under_a_limit_range(cluster, launcher):
    # Every container without limits gets 256Mi; the outputs sidecar has its own, smaller one.
    job = ranks_job("--write-mb", "200")
    launcher.plan(job, "big-outputs")
    import kubernetes.stream  # noqa: F401 - imported before memory is counted, like the client above

    with cluster.limit_range({"default": {"memory": "256Mi"}, "max": {"memory": "1Gi"}}):
        tracemalloc.start()
        try:
            handle, _ = run(launcher, job, "big-outputs")
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        outputs = launcher.collect_outputs(handle) / "outputs"
    written = json.loads((outputs / "digests.json").read_text())
    assert len(written) == 13
    for name, digest in written.items():
        assert hashlib.sha256((outputs / "model" / name).read_bytes()).hexdigest() == digest
    assert sum(path.stat().st_size for path in (outputs / "model").iterdir()) == 200 * MiB
    assert peak < 16 * MiB, f"this process held {peak / MiB:.0f} MiB at once"
    sidecar = next(
        bytes_
        for name, bytes_ in cluster.memory_peaks().items()
        if "big-outputs" in name and name.endswith("/outputs")
    )
    assert (
        sidecar < 128 * MiB
    )  # under its limit: it was never killed, and a copy held in memory needs 3x more
    assert_nothing_left(cluster)


def test_a_container_past_its_memory_limit_is_oomkilled_and_the_job_fails_naming_it(
    cluster, monkeypatch, tmp_path
):
    launcher = fake_launcher(
        cluster, monkeypatch, tmp_path, container_resources={"limits": {"memory": "96Mi"}}
    )
    with pytest.raises(JobFailed) as failure:
        run(launcher, ranks_job("--allocate-mb", "200"), "oom")
    assert "was OOMKilled: it went past its memory limit of 96Mi (exit code 137)" in str(failure.value)
    assert failure.value.status.exit_code == 137
    assert_nothing_left(cluster)


def test_a_pod_past_the_limit_range_is_refused_naming_the_limit(cluster, launcher):
    with cluster.limit_range({"max": {"memory": "64Mi"}}), pytest.raises(CreationRefused) as refused:
        run(launcher, ranks_job(), "over-the-range")
    assert str(refused.value) == (
        'run over-the-range: the cluster refused it: 403 Forbidden: pods "over-the-range-worker-0" is '
        "forbidden: maximum memory usage per Container is 64Mi, but limit is 128Mi"
    )
    assert_nothing_left(cluster)


def test_pods_end_at_their_deadline_when_no_task_ends_them(cluster, launcher, monkeypatch):
    monkeypatch.setattr(kubernetes_settings, "DEADLINE_MARGIN_SECONDS", 0)
    job = ranks_job("--sleep", "120")
    handle = launcher.submit(job, launcher.plan(job, "deadline"), extra_env={}, time_limit=4)
    pod = cluster.objects("pods")[0]
    assert pod["spec"]["activeDeadlineSeconds"] == 4
    with pytest.raises(JobFailed) as failure:
        wait_for_job(launcher, handle, lambda line: None, timeout=60)  # a wait that would have let it run
    assert "was stopped by Kubernetes: DeadlineExceeded" in str(failure.value)
    assert_nothing_left(cluster)
