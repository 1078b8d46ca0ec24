"""The Kubernetes launcher on a cluster that misbehaves on purpose (tests/fake_kubernetes/faults.py):
answers lost after the change was made, a Role that grants only what docs/kubernetes.md documents,
an outputs' copy that keeps being cut, an API server down for longer than a run allows."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from fake_kubernetes import assert_nothing_left, fake_launcher
from fake_kubernetes import ranks_job as two_ranks_job
from launcher_jobs import run_job as run
from launcher_jobs import wait_in_background
from long_lines import assert_lines_whole_bounded_and_throttled, long_lines_job

from airflow_provider_dnntrain import cli
from airflow_provider_dnntrain.backends.base import JobFailed, OutputsLost
from airflow_provider_dnntrain.backends.kubernetes.api import ApiUnavailable
from airflow_provider_dnntrain.spec import TrainingJob

REPO = Path(__file__).resolve().parents[3]
TEST_SCRIPTS = REPO / "tests" / "scripts"


@pytest.fixture
def launcher(cluster, monkeypatch, tmp_path):
    return fake_launcher(cluster, monkeypatch, tmp_path, api_request_timeout=3)


def ranks_job(*arguments: str) -> TrainingJob:
    return two_ranks_job(*arguments, nodes=2)


def documented_role() -> list[dict]:
    page = (REPO / "docs" / "kubernetes.md").read_text()
    block = re.search(r"```yaml\n(# dnntrain-launcher-role\.yaml\n.*?)```", page, re.DOTALL).group(1)
    return yaml.safe_load(block)["rules"]


def test_creates_whose_answers_were_lost_are_not_made_twice(cluster, launcher):
    # The run's ConfigMap, Secret, Service and first pod are made, but the client hears 500 each time.
    with cluster.misbehaving(lose_answers=4):
        handle, lines = run(launcher, ranks_job("--ticks", "2"), "lost-answers")
        injected = cluster.injected()["injected"]
    assert injected["500 after the change"] == 4
    assert (launcher.collect_outputs(handle) / "outputs" / "argv-0.json").is_file()
    assert sum("tick 1 of 2" in line.text for line in lines) == 2
    assert_nothing_left(cluster)


@pytest.mark.parametrize("collection_delete", [True, False], ids=["documented", "no-deletecollection"])
def test_the_documented_role_is_enough_and_nothing_is_left(cluster, launcher, collection_delete):
    rules = documented_role()
    if not collection_delete:
        for rule in rules:
            rule["verbs"] = [verb for verb in rule["verbs"] if verb != "deletecollection"]
    with cluster.misbehaving(rules):
        handle, _ = run(launcher, ranks_job("--ticks", "2"), f"least-privilege-{collection_delete}")
        denied = cluster.injected()["denied"]
    assert denied == ({} if collection_delete else {"deletecollection pods": 1})
    assert (launcher.collect_outputs(handle) / "outputs" / "argv-0.json").is_file()
    assert_nothing_left(cluster)


def test_an_outputs_copy_that_keeps_being_cut_fails_the_run(cluster, launcher):
    with cluster.misbehaving(cut_execs=5):
        handle, _ = run(launcher, ranks_job(), "outputs-cut")
    with pytest.raises(OutputsLost, match=r"could not be copied \(5 tries\)"):
        launcher.collect_outputs(handle)
    assert_nothing_left(cluster)


def test_outputs_not_required_are_a_warning(cluster, monkeypatch, tmp_path, caplog):
    launcher = fake_launcher(cluster, monkeypatch, tmp_path, outputs_required=False)
    with cluster.misbehaving(cut_execs=5):
        handle, _ = run(launcher, ranks_job(), "outputs-optional")
    assert launcher.collect_outputs(handle).is_dir()
    assert "the chief's outputs were not collected" in caplog.text
    assert_nothing_left(cluster)


def test_an_api_down_for_longer_than_allowed_fails_the_run_naming_the_last_error(
    cluster, monkeypatch, tmp_path
):
    launcher = fake_launcher(cluster, monkeypatch, tmp_path, api_unavailable_timeout=3)
    job = ranks_job("--sleep", "60")
    handle = launcher.submit(job, launcher.plan(job, "api-down"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    while not handle.logs.cursors:  # both pods run
        time.sleep(0.2)
    started = time.monotonic()
    with cluster.misbehaving(error_rate=1.0, statuses=[503]):
        thread.join(timeout=60)
    assert isinstance(outcome.get("error"), ApiUnavailable), outcome
    assert "unusable for 3 s" in str(outcome["error"]) and "503" in str(outcome["error"])
    assert time.monotonic() - started < 30
    launcher.cancel(handle)  # the API is back: what the failed run left goes
    assert_nothing_left(cluster)


def test_progress_bars_and_long_lines_read_like_on_every_backend_while_streams_are_cut(cluster, launcher):
    with cluster.misbehaving(cut_logs_after=1):
        _, lines = run(launcher, long_lines_job(), "long-lines")
    assert_lines_whole_bounded_and_throttled([line.text for line in lines])
    assert_nothing_left(cluster)


# -- waiting is not failing ---------------------------------------------------------------------------
# Each waits several times the launcher's 5 s startup bound: the bound for scheduled -> running.


def test_pods_kueue_holds_wait_for_admission_then_train(cluster, monkeypatch, tmp_path, caplog):
    caplog.set_level("INFO")
    launcher = fake_launcher(
        cluster,
        monkeypatch,
        tmp_path,
        gang_scheduling="kueue",
        queue_name="team-a",
        startup_timeout_seconds=5,
    )
    with cluster.misbehaving(kueue_admit_after=15):
        handle, lines = run(launcher, ranks_job("--ticks", "2"), "kueue-gated")
    assert sum("tick 1 of 2" in line.text for line in lines) == 2
    assert "2 wait to be scheduled: a scheduling gate (queue team-a)" in caplog.text
    assert_nothing_left(cluster)


def test_pods_wait_while_the_autoscaler_adds_a_node(cluster, monkeypatch, tmp_path, caplog):
    caplog.set_level("INFO")
    launcher = fake_launcher(cluster, monkeypatch, tmp_path, startup_timeout_seconds=5)
    with cluster.misbehaving(scale_up_after=12):
        _, lines = run(launcher, ranks_job("--ticks", "2"), "scale-up")
    assert sum("tick 1 of 2" in line.text for line in lines) == 2
    assert "wait to be scheduled: Unschedulable: 0/1 nodes are available: 1 Insufficient cpu." in caplog.text
    assert_nothing_left(cluster)


def test_kubelet_retries_a_throttled_pull_until_the_image_is_there(cluster, monkeypatch, tmp_path):
    launcher = fake_launcher(
        cluster, monkeypatch, tmp_path, startup_timeout_seconds=5, image="dnntrain-torch:late"
    )
    with cluster.misbehaving(images_appear_after={"dnntrain-torch:late": 10}):
        _, lines = run(launcher, ranks_job("--ticks", "2"), "image-late")
    assert sum("tick 1 of 2" in line.text for line in lines) == 2
    assert_nothing_left(cluster)


def test_a_pull_retried_past_the_image_pull_timeout_fails_naming_the_registrys_answer(
    cluster, monkeypatch, tmp_path
):
    launcher = fake_launcher(
        cluster,
        monkeypatch,
        tmp_path,
        image="dnntrain-torch:never",
        image_pull_timeout=4,
        startup_timeout_seconds=60,
    )
    started = time.monotonic()
    with (
        cluster.misbehaving(images_appear_after={"dnntrain-torch:never": 600}),
        pytest.raises(
            JobFailed, match=r"cannot start: (ErrImagePull|ImagePullBackOff): .*429 Too Many .*4 s"
        ),
    ):
        run(launcher, ranks_job(), "image-throttled")
    assert time.monotonic() - started < 30
    assert_nothing_left(cluster)


# -- nothing runs on after its task is gone ----------------------------------------------------------


def test_a_task_killed_outright_leaves_no_process_running_and_gc_clears_the_rest(
    cluster, monkeypatch, tmp_path
):
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_FAKE", cluster.airflow_connection())
    options = {"kubernetes_conn_id": "kubernetes_fake", "orphan_timeout": 6, "poll_interval": 0.5}
    argv = [sys.executable, TEST_SCRIPTS / "task_process.py", tmp_path, "orphaned"]
    argv += [ranks_job("--sleep", "300").model_dump_json(), json.dumps(options)]
    task = subprocess.Popen([str(a) for a in argv], stdout=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while sum("ranks.py" in command for command in cluster.pod_commands().values()) < 2:
            assert time.monotonic() < deadline and task.poll() is None, cluster.pod_commands()
            time.sleep(0.5)
    finally:
        os.killpg(task.pid, signal.SIGKILL)  # as when the worker's node is lost, and no retry is left
        task.wait()
    killed = time.monotonic()
    while cluster.pod_processes() and time.monotonic() - killed < 60:
        time.sleep(0.5)
    assert cluster.pod_processes() == []
    assert time.monotonic() - killed < 6 + 5 + 2 + 5  # the timeout, a lease check, a volume sync, a margin
    assert [c["metadata"]["name"] for c in cluster.objects("configmaps")] == ["orphaned"]  # left to gc
    assert cli.main(["gc", "--kubernetes-conn-id", "kubernetes_fake", "--older-than", "6"]) == 0
    assert_nothing_left(cluster)


def test_a_missing_config_map_fails_at_once_naming_it(cluster, monkeypatch, tmp_path):
    launcher = fake_launcher(
        cluster, monkeypatch, tmp_path, startup_timeout_seconds=60,
        volumes=[{"name": "settings", "configMap": {"name": "team-settings"}}],
        volume_mounts=[{"name": "settings", "mountPath": "/etc/team"}],
    )  # fmt: skip
    started = time.monotonic()
    with pytest.raises(
        JobFailed, match=r'cannot start: CreateContainerConfigError: configmap "team-settings" not'
    ):
        run(launcher, ranks_job(), "missing-config-map")
    assert time.monotonic() - started < 20  # not the 60 s startup bound: kubelet cannot fix this
    assert_nothing_left(cluster)
