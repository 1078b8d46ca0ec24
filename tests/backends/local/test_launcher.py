"""The local launcher with real processes (a stand-in script, so each test takes a second or two)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from airflow_provider_dnntrain.backends.base import JobFailed, JobState, wait_for_job
from airflow_provider_dnntrain.backends.common import reaper
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
from airflow_provider_dnntrain.spec import (
    Horovod,
    MultiWorkerMirrored,
    ParameterServer,
    SingleNode,
    TorchDistributed,
    TrainingJob,
)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


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


def living(pids) -> list[int]:
    return [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def run(launcher, job, run_id="run-1", plan=None, stop_grace=0, **wait_kwargs):
    plan = plan or launcher.plan(job, run_id)
    handle = launcher.submit(job, plan, extra_env={})
    lines = []
    try:
        wait_for_job(launcher, handle, lines.append, **wait_kwargs)
    finally:
        if stop_grace is not None:
            launcher.stop(handle, grace_seconds=stop_grace)
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
    (source / "data").mkdir()
    (source / "data" / "train.bin").write_bytes(b"\0" * 1024)
    (source / ".dnntrainignore").write_text("data/\n")
    for script in ("replica.py", "published.py"):
        (source / script).write_text((SCRIPTS / script).read_text())
    job = make_job(["--serve", "worker-0", "--serve", "worker-1"], source=source)
    plan = launcher.plan(job, "snap")
    handle = launcher.submit(job, plan, extra_env={})
    try:
        (source / "replica.py").write_text("raise SystemExit(99)\n")
        (source / "new_file.txt").write_text("late")
        assert not (handle.run_dir / "source" / "outputs").exists()
        assert not (handle.run_dir / "source" / "data").exists()  # listed in .dnntrainignore
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
    started = time.monotonic()
    launcher.cancel(handle)  # what on_kill calls from Airflow's SIGTERM handler: must not block
    assert time.monotonic() - started < 0.5
    assert launcher.poll(handle).state is JobState.CANCELLED
    # Nobody calls stop (the task process may be SIGKILLed right after on_kill): the reapers escalate
    # to SIGKILL themselves after the grace, and take the setsid'd grandchild with them.
    deadline = time.monotonic() + launcher.stop_grace_seconds + 10
    while living(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert living(pids) == []
    launcher.stop(handle, grace_seconds=0)


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
    with pytest.raises(ValueError, match="entry_script: 'replica.py' is not a file in"):
        launcher.submit(job, launcher.plan(job, "nothing"), extra_env={})


def test_each_replica_has_its_own_copy_of_the_source(launcher, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for script in ("replica.py", "published.py"):
        (source / script).write_text((SCRIPTS / script).read_text())
    (source / "scratch.txt").write_text("untouched")
    handle, _ = run(launcher, make_job([], source=source))
    for name in ("worker-0", "worker-1"):
        overwritten = name + "untouched"[len(name) :]  # its own name over the start, nobody else's
        assert (handle.run_dir / "replicas" / name / "scratch.txt").read_text() == overwritten
    assert (source / "scratch.txt").read_text() == "untouched"
    assert (handle.run_dir / "source" / "scratch.txt").read_text() == "untouched"


# -- process lifetime: the cases issue #8 found ------------------------------------------------------


def wait_for_files(paths, timeout=30.0) -> None:
    deadline = time.monotonic() + timeout
    while not all(p.exists() for p in paths) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(p.exists() for p in paths), [p for p in paths if not p.exists()]


def process_with_pid(pid: int, attempts: int = 200) -> subprocess.Popen | None:
    """Start an unrelated sleeper in a session of its own that gets exactly ``pid`` (root only: steers
    the kernel's next PID through /proc/sys/kernel/ns_last_pid), as PID reuse would."""
    for _ in range(attempts):
        Path("/proc/sys/kernel/ns_last_pid").write_text(str(pid - 1))
        sleeper = subprocess.Popen(["sleep", "60"], start_new_session=True)
        if sleeper.pid == pid:
            return sleeper
        sleeper.kill()
        sleeper.wait()
    return None


def test_stopping_never_signals_a_process_that_reuses_a_replica_pid(launcher):
    job = make_job([])
    handle = launcher.submit(job, launcher.plan(job, "reuse"), extra_env={})
    reaper_pid = handle.processes["worker-0"].popen.pid
    for process in handle.processes.values():
        process.popen.wait(timeout=30)  # exited and reaped: the PID is free for anyone
    imposter = process_with_pid(reaper_pid)
    assert imposter is not None, "could not get the kernel to reuse the PID"
    try:
        launcher.stop(handle, grace_seconds=1)
        time.sleep(0.2)
        assert imposter.poll() is None, "an unrelated process (and its group) was signalled"
    finally:
        imposter.kill()
        imposter.wait()


def test_stopping_is_bounded_even_when_a_reaper_does_not_answer(launcher):
    job = make_job(["--spawn"])
    handle = launcher.submit(job, launcher.plan(job, "stuck"), extra_env={})
    pid_files = [handle.run_dir / "replicas" / n / "outputs" / "pids.json" for n in ("worker-0", "worker-1")]
    wait_for_files(pid_files)
    pids = [pid for f in pid_files for pid in json.loads(f.read_text()).values()]
    stuck = handle.processes["worker-0"].popen.pid
    os.kill(stuck, signal.SIGSTOP)  # a reaper that cannot act on SIGTERM any more
    started = time.monotonic()
    launcher.stop(handle, grace_seconds=1)
    assert time.monotonic() - started < 1 + 7 + 3  # grace + the reaper's slack + margin, not forever
    assert living([*pids, stuck]) == []


def test_replicas_start_without_preexec_fn(launcher, monkeypatch):
    """preexec_fn runs Python between fork and exec while reader threads hold locks (a documented
    deadlock); the reaper sets itself up after exec instead."""
    seen = []
    real_popen = subprocess.Popen

    def recording_popen(*args, **kwargs):
        seen.append(kwargs)
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", recording_popen)
    run(launcher, make_job([]))
    assert len(seen) == 2 and all(kwargs.get("preexec_fn") is None for kwargs in seen)


def test_a_port_taken_after_planning_is_planned_again(launcher):
    job = make_job(["--bind"])
    plan = launcher.plan(job, "ports")
    taken = plan.replicas[0].port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        handle, lines = run(launcher, job, "ports", plan=plan)
    assert handle.plan.replicas[0].port != taken
    assert any("listening on 127.0.0.1" in line.text for line in lines)
    assert json.loads((handle.run_dir / "plan.json").read_text())["replicas"][0]["port"] != taken


def test_resubmitting_ends_what_a_dead_leader_left_behind(launcher):
    job = make_job(["--spawn"])
    first = launcher.submit(job, launcher.plan(job, "orphans"), extra_env={})
    pid_files = [first.run_dir / "replicas" / n / "outputs" / "pids.json" for n in ("worker-0", "worker-1")]
    wait_for_files(pid_files)
    children = [pid for f in pid_files for key, pid in json.loads(f.read_text()).items() if key != "self"]
    for process in first.processes.values():  # the reaper and the replica die; their children do not
        replica_pid = json.loads((process.workdir / "outputs" / "pids.json").read_text())["self"]
        os.kill(process.popen.pid, signal.SIGKILL)
        os.kill(replica_pid, signal.SIGKILL)
        process.popen.wait()
    time.sleep(0.3)
    assert len(living(children)) == 4
    second_job = make_job([])
    second = launcher.submit(second_job, launcher.plan(second_job, "orphans"), extra_env={})
    try:
        assert living(children) == []
        assert wait_for_job(launcher, second, lambda line: None).state is JobState.SUCCEEDED
    finally:
        launcher.stop(first, grace_seconds=0)


def test_stopping_what_is_left_gives_the_launchers_grace(tmp_path):
    launcher = LocalLauncher(work_root=tmp_path / "runs", stop_grace_seconds=10)
    dist = ParameterServer(worker_count=1, parameter_server_count=1, chief=True)
    job = make_job(["--graceful", "ps-0:4", "--sleep", "2"], dist)  # the ps needs 4 s to save on SIGTERM
    handle, lines = run(launcher, job, "grace", stop_grace=None, timeout=60)
    assert (handle.run_dir / "replicas" / "ps-0" / "outputs" / "graceful.txt").read_text() == "saved"


def test_secrets_a_replica_prints_are_masked_in_every_log(launcher):
    job = make_job(
        ["--print-env", "MY_TOKEN", "--print-env", "MULTI"],
        environment={"secrets": {"MY_TOKEN": "tok-sekrit-9f2", "MULTI": "first-line\nsecond-line"}},
    )
    handle, lines = run(launcher, job)
    texts = [line.text for line in lines]
    assert "worker-0 MY_TOKEN=***" in texts and "worker-0 MULTI=***" in texts and "***" in texts
    for log in [*handle.run_dir.glob("logs/*.log"), *launcher.collect_outputs(handle).rglob("*.log")]:
        content = log.read_text()
        assert "tok-sekrit-9f2" not in content and "second-line" not in content
        assert "MY_TOKEN=***" in content
    assert oct(handle.run_dir.stat().st_mode & 0o777) == "0o700"


# -- the task process dying abruptly, for every topology ---------------------------------------------

SLEEPERS = ["--spawn", "--sleep", "600"]
TOPOLOGIES = {
    "single": ("tensorflow", "replica.py", ["--spawn"], SingleNode()),
    "parameter_server": ("tensorflow", "replica.py", ["--spawn"], ParameterServer(worker_count=1)),
    "multi_worker_mirrored": ("tensorflow", "replica.py", ["--spawn"], MultiWorkerMirrored(worker_count=2)),
    "torchrun": ("pytorch", "ranks.py", SLEEPERS, TorchDistributed(process_count_per_node=2)),
    "horovodrun-gloo": ("pytorch", "ranks.py", SLEEPERS, Horovod(process_count_per_node=2)),
    "horovodrun-mpi": ("pytorch", "ranks.py", SLEEPERS, Horovod(process_count_per_node=2, controller="mpi")),
    "mpirun": (
        "pytorch",
        "ranks.py",
        SLEEPERS,
        Horovod(process_count_per_node=2, runner="mpirun", controller="mpi"),
    ),
}


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_nothing_outlives_a_task_process_that_is_sigkilled(tmp_path, topology):
    """SIGKILL gives the task no chance to clean up (the Airflow 3 supervisor sends it when on_kill
    overruns): the reapers notice and stop every replica, rank and child."""
    framework, script, arguments, distribution = TOPOLOGIES[topology]
    job = TrainingJob(
        framework=framework,
        source_directory=str(SCRIPTS),
        entry_script=script,
        arguments=arguments,
        distribution=distribution,
    )
    task = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "task_process.py"), str(tmp_path), "abrupt", job.model_dump_json()],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        launch_id = task.stdout.readline().split()[1]
        children = wait_for_children(
            tmp_path / "abrupt" / "replicas", expected=2 if script == "ranks.py" else len(job_replicas(job))
        )
        before = reaper.processes_with_environment(f"DNNTRAIN_LAUNCH_ID={launch_id}")
        assert set(children) <= set(before)
        os.kill(task.pid, signal.SIGKILL)
        task.wait(timeout=10)
        deadline = time.monotonic() + 3 + 7 + 5  # the grace, the reapers' slack, a margin
        while reaper.alive(before) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert reaper.alive(before) == {}
        assert reaper.processes_with_environment(f"DNNTRAIN_LAUNCH_ID={launch_id}") == {}
    finally:
        if task.poll() is None:
            os.killpg(task.pid, signal.SIGKILL)


def job_replicas(job: TrainingJob) -> list[str]:
    return [replica.name for replica in LocalLauncher().plan(job, "x").replicas]


def wait_for_children(replicas: Path, expected: int) -> list[int]:
    """The pids of every process the script started, once each replica or rank has written them."""
    deadline = time.monotonic() + 120
    while len(files := list(replicas.glob("*/outputs/pids*.json"))) < expected:
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.1)
    time.sleep(0.3)
    return [pid for f in files for pid in json.loads(f.read_text()).values()]
