"""The local launcher with real processes (a stand-in script, so each test takes a second or two)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from airflow_provider_dnntrain.launchers.base import JobFailed, JobState, wait_for_job
from airflow_provider_dnntrain.launchers.local import LocalLauncher
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, ParameterServer, TrainingJob

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def make_job(arguments, distribution=None, source=SCRIPTS, **extra) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(source),
        entry_script="replica.py",
        arguments=arguments,
        distribution=distribution or MultiWorkerMirrored(worker_count=2),
        **extra,
    )


@pytest.fixture
def launcher(tmp_path):
    return LocalLauncher(work_root=tmp_path / "runs", stop_grace_seconds=2)


def run(launcher, job, run_id="run-1", **wait_kwargs):
    plan = launcher.plan(job, run_id)
    handle = launcher.submit(job, plan, extra_env={})
    lines = []
    try:
        wait_for_job(launcher, handle, lines.append, **wait_kwargs)
    finally:
        launcher.stop(handle, grace_seconds=0)
    return handle, lines


def test_every_line_of_every_replica_arrives_whole_and_prefixed(launcher):
    handle, lines = run(launcher, make_job(["--lines", "400", "--partial"]))
    for name in ("worker-0", "worker-1"):
        mine = [line.text for line in lines if line.replica == name]
        numbered = [t for t in mine if " line " in t]
        assert numbered == [f"{name} line {i} " + "x" * (i % 50) for i in range(400)]
        assert mine[-1] == f"{name} partial-end"
    assert all(str(line).startswith(f"[{line.replica}] {line.replica}") for line in lines)
    log_file = (handle.run_dir / "logs" / "worker-1.log").read_text()
    assert log_file.count("worker-1 line") == 400


def test_hostile_arguments_arrive_literally(launcher):
    hostile = ["; rm -rf /tmp/x", "$(touch /tmp/pwned)", "`id`", "a\nb", "'quoted' \"double\"", "", "*", "--"]
    handle, _ = run(launcher, make_job(hostile))
    for name in ("worker-0", "worker-1"):
        argv = json.loads((handle.run_dir / "replicas" / name / "outputs" / "argv.json").read_text())
        assert argv == hostile
    assert not Path("/tmp/pwned").exists()


def test_replicas_get_distinct_free_ports_and_the_job_environment(launcher):
    job = make_job([], environment={"variables": {"MY_VAR": "42"}, "secrets": {"MY_TOKEN": "s3cret"}})
    handle, _ = run(launcher, job)
    envs = [
        json.loads((handle.run_dir / "replicas" / n / "outputs" / "env.json").read_text())
        for n in ("worker-0", "worker-1")
    ]
    cluster = json.loads(envs[0]["TF_CONFIG"])["cluster"]["worker"]
    assert len(set(cluster)) == 2 and all(addr.startswith("127.0.0.1:") for addr in cluster)
    assert all(env["MY_VAR"] == "42" and env["MY_TOKEN"] == "s3cret" for env in envs)
    assert not any(key.startswith("AIRFLOW") for env in envs for key in env)
    assert "s3cret" not in (handle.run_dir / "plan.json").read_text()


def test_source_is_snapshotted_at_submit(launcher, tmp_path):
    source = tmp_path / "src"
    (source / "outputs").mkdir(parents=True)
    (source / "outputs" / "stale.txt").write_text("from a manual run")
    (source / "replica.py").write_text((SCRIPTS / "replica.py").read_text())
    job = make_job(["--serve", "worker-0", "--serve", "worker-1"], source=source)
    plan = launcher.plan(job, "snap")
    handle = launcher.submit(job, plan, extra_env={})
    try:
        (source / "replica.py").write_text("raise SystemExit(99)\n")
        (source / "new_file.txt").write_text("late")
        assert not (handle.run_dir / "source" / "outputs").exists()
        snapshot = handle.run_dir / "replicas" / "worker-0"
        assert "argparse" in (snapshot / "replica.py").read_text()
        assert not (snapshot / "new_file.txt").exists()
    finally:
        launcher.cancel(handle)


def test_one_failing_replica_fails_the_job_fast_and_stops_the_rest(launcher):
    job = make_job(["--fail", "worker-1:3", "--serve", "worker-0"])
    started = time.monotonic()
    with pytest.raises(JobFailed) as excinfo:
        run(launcher, job)
    assert time.monotonic() - started < 15
    status = excinfo.value.status
    assert (status.failed_replica, status.exit_code) == ("worker-1", 3)
    assert "replica worker-1 failed with exit code 3" in str(excinfo.value)
    assert "worker-1 about to fail" in str(excinfo.value)


def test_parameter_servers_are_stopped_when_the_chief_succeeds(launcher):
    dist = ParameterServer(worker_count=2, parameter_server_count=1, chief=True)
    job = make_job(["--serve", "ps-0", "--serve", "worker-0", "--serve", "worker-1", "--sleep", "1"], dist)
    plan = launcher.plan(job, "ps-run")
    handle = launcher.submit(job, plan, extra_env={})
    pids = [p.popen.pid for p in handle.processes.values()]
    status = wait_for_job(launcher, handle, lambda line: None)
    assert status.state is JobState.SUCCEEDED
    assert not [pid for pid in pids if psutil.pid_exists(pid)]
    artifacts = launcher.collect_outputs(handle)
    assert (artifacts / "outputs" / "who.txt").read_text() == "chief-0"
    assert (artifacts / "logs" / "note.txt").read_text() == "log of chief-0"


def test_a_parameter_server_that_exits_fails_the_job(launcher):
    dist = ParameterServer(worker_count=1, parameter_server_count=1, chief=True)
    job = make_job(["--serve", "chief-0", "--serve", "worker-0", "--sleep", "1"], dist)
    with pytest.raises(JobFailed, match="replica ps-0 exited before the job finished"):
        run(launcher, job)


def test_cancel_leaves_no_process_behind(launcher):
    job = make_job(["--spawn", "--ignore-term"])
    plan = launcher.plan(job, "kill-me")
    handle = launcher.submit(job, plan, extra_env={})
    pid_files = [handle.run_dir / "replicas" / n / "outputs" / "pids.json" for n in ("worker-0", "worker-1")]
    deadline = time.monotonic() + 30
    while not all(f.exists() for f in pid_files) and time.monotonic() < deadline:
        time.sleep(0.1)
    pids = [pid for f in pid_files for pid in json.loads(f.read_text()).values()]
    assert all(psutil.pid_exists(pid) for pid in pids)
    launcher.cancel(handle)
    assert launcher.poll(handle).state is JobState.CANCELLED
    survivors = [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]
    assert survivors == []


def test_job_timeout_fails_and_stops_everything(launcher):
    job = make_job(["--serve", "worker-0", "--serve", "worker-1"])
    with pytest.raises(JobFailed, match="timed out"):
        run(launcher, job, timeout=2)


def test_resubmitting_a_run_id_replaces_the_previous_attempt(launcher):
    job = make_job(["--serve", "worker-0", "--serve", "worker-1"])
    first = launcher.submit(job, launcher.plan(job, "again"), extra_env={})
    old_pids = [p.popen.pid for p in first.processes.values()]
    second_job = make_job([])
    second = launcher.submit(second_job, launcher.plan(second_job, "again"), extra_env={})
    try:
        assert wait_for_job(launcher, second, lambda line: None).state is JobState.SUCCEEDED
        for popen in (p.popen for p in first.processes.values()):
            popen.wait(timeout=10)
        assert not [pid for pid in old_pids if psutil.pid_exists(pid)]
    finally:
        launcher.stop(first, grace_seconds=0)


def test_missing_entry_script_is_reported_before_launch(launcher, tmp_path):
    job = make_job([], source=tmp_path)
    with pytest.raises(FileNotFoundError, match="entry_script 'replica.py' not found"):
        launcher.submit(job, launcher.plan(job, "nothing"), extra_env={})


def test_each_replica_has_its_own_copy_of_the_source(launcher, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "replica.py").write_text((SCRIPTS / "replica.py").read_text())
    (source / "scratch.txt").write_text("untouched")
    handle, _ = run(launcher, make_job([], source=source))
    for name in ("worker-0", "worker-1"):
        overwritten = name + "untouched"[len(name) :]  # its own name over the start, nobody else's
        assert (handle.run_dir / "replicas" / name / "scratch.txt").read_text() == overwritten
    assert (source / "scratch.txt").read_text() == "untouched"
    assert (handle.run_dir / "source" / "scratch.txt").read_text() == "untouched"
