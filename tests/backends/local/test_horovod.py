"""Horovod on the local launcher: real ranks started by horovodrun or mpirun, exchanging tensors."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path

import psutil
import pytest
from hostile import HOSTILE_ARGUMENTS, PWNED

from airflow_provider_dnntrain.backends.base import JobFailed, JobState, wait_for_job
from airflow_provider_dnntrain.backends.common import reaper
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
from airflow_provider_dnntrain.spec import Environment, Horovod, TrainingJob

REPO = Path(__file__).resolve().parents[3]
EXAMPLE_SCRIPTS = REPO / "dags" / "scripts"
TEST_SCRIPTS = REPO / "tests" / "scripts"
MPIRUN = {"runner": "mpirun", "controller": "mpi"}


def horovod_job(framework, script, arguments, source=EXAMPLE_SCRIPTS, **dist) -> TrainingJob:
    return TrainingJob(
        framework=framework,
        source_directory=str(source),
        entry_script=script,
        arguments=arguments,
        distribution=Horovod(node_count=1, process_count_per_node=2, **dist),
        environment={"variables": {"TF_CPP_MIN_LOG_LEVEL": "2"}},
    )


def run(tmp_path, job, run_id):
    launcher = LocalLauncher(work_root=tmp_path, stop_grace_seconds=3)
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    lines = []
    try:
        wait_for_job(launcher, handle, lines.append, timeout=300)
    finally:
        launcher.stop(handle, grace_seconds=0)
    return launcher, handle, lines


def rank_lines(lines, rank: int) -> list[str]:
    """A rank's lines, whichever way the runner labels them (per-rank files or horovodrun's prefix)."""
    by_file = [line.text for line in lines if line.replica.endswith(f"/rank.{rank}")]
    by_prefix = [line.text.split(":", 1)[1] for line in lines if line.text.startswith(f"[{rank}]<stdout>:")]
    return by_file + by_prefix


@pytest.mark.slow
@pytest.mark.parametrize(
    ("framework", "script", "dist"),
    [
        ("pytorch", "torch_horovod_digits.py", MPIRUN),
        ("pytorch", "torch_horovod_digits.py", {"controller": "mpi"}),
        ("tensorflow", "tf_horovod_digits.py", {"controller": "gloo"}),
    ],
    ids=["torch-mpirun", "torch-horovodrun-mpi", "tf-horovodrun-gloo"],
)
def test_ranks_allreduce_and_end_with_identical_weights(tmp_path, framework, script, dist):
    launcher, handle, lines = run(tmp_path, horovod_job(framework, script, ["--epochs", "2"], **dist), "hvd")
    for rank in (0, 1):
        mine = "\n".join(rank_lines(lines, rank))
        assert f"rank={rank} size=2" in mine and "allreduce_sum=3.0" in mine
        assert f"launcher_rank={rank}" in mine  # OMPI_COMM_WORLD_RANK or HOROVOD_RANK was set
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    first, second = facts["weights_checksums"]
    assert first == pytest.approx(second, abs=1e-5)  # seeded differently, broadcast + averaged gradients


@pytest.mark.parametrize(
    ("dist", "runner_says"),
    # horovodrun says it twice, in two wordings, and its traceback may push the first out of the tail
    [
        (MPIRUN, r"Exit code:    4"),
        ({"controller": "gloo"}, r"Process 1 exit with status code 4|Process name: 1\s+Exit code: 4"),
    ],
    ids=["mpirun", "horovodrun-gloo"],
)
def test_a_failing_rank_fails_the_job_fast(tmp_path, dist, runner_says):
    job = horovod_job("pytorch", "mpi_rank.py", ["--fail", "1:4"], source=TEST_SCRIPTS, **dist)
    started = time.monotonic()
    with pytest.raises(JobFailed) as excinfo:
        run(tmp_path, job, "hvd-fail")
    assert time.monotonic() - started < 60
    assert excinfo.value.status.failed_replica == "launcher-0"
    assert re.search(runner_says, str(excinfo.value)), str(excinfo.value)
    run_dir = tmp_path / "hvd-fail" / "replicas" / "launcher-0" / "outputs"
    pids = [int(p.read_text()) for p in run_dir.glob("rank-*.pid")]
    assert len(pids) == 2
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


@pytest.mark.parametrize("dist", [MPIRUN, {"controller": "gloo"}], ids=["mpirun", "horovodrun-gloo"])
def test_cancel_leaves_no_rank_behind(tmp_path, dist):
    job = horovod_job("pytorch", "mpi_rank.py", ["--hang"], source=TEST_SCRIPTS, **dist)
    launcher = LocalLauncher(work_root=tmp_path, stop_grace_seconds=3)
    handle = launcher.submit(job, launcher.plan(job, "hvd-kill"), extra_env={})
    outputs = tmp_path / "hvd-kill" / "replicas" / "launcher-0" / "outputs"
    deadline = time.monotonic() + 60
    while len(list(outputs.glob("rank-*.pid"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    pids = [int(p.read_text()) for p in outputs.glob("rank-*.pid")]
    assert len(pids) == 2
    launcher.cancel(handle)
    assert launcher.poll(handle).state is JobState.CANCELLED
    launcher.stop(handle, launcher.stop_grace_seconds)  # what wait_for_job does next
    assert not [pid for pid in pids if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_the_local_launcher_refuses_multi_node_horovod(tmp_path):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="mpi_rank.py",
        distribution=Horovod(node_count=2, process_count_per_node=1),
    )
    with pytest.raises(
        ValueError, match="distribution.node_count: the local launcher runs Horovod on this one host"
    ):
        LocalLauncher(work_root=tmp_path).plan(job, "x")


def test_mpirun_rank_lines_arrive_whole_and_labelled(tmp_path):
    job = horovod_job("pytorch", "mpi_rank.py", [], source=TEST_SCRIPTS, **MPIRUN)
    _, _, lines = run(tmp_path, job, "hvd-lines")
    assert {(line.replica, line.text) for line in lines if "up" in line.text} == {
        ("launcher-0/rank.0", "rank 0 of 2 up"),
        ("launcher-0/rank.1", "rank 1 of 2 up"),
    }
    assert not [line for line in lines if re.search(r"\[1,\d\]<std", line.text)]


@pytest.mark.parametrize(
    "dist",
    [MPIRUN, {"controller": "mpi"}, {"controller": "gloo"}],
    ids=["mpirun", "horovodrun-mpi", "horovodrun-gloo"],
)
def test_hostile_arguments_and_secrets_reach_every_rank_literally(tmp_path, dist):
    """horovodrun joins the command into a shell string (and, with Gloo, every variable too)."""
    secret = "s3cr3t-$(id)-'quoted'"
    job = horovod_job(
        "pytorch", "ranks.py", [*HOSTILE_ARGUMENTS, "--print-env", "RANK_SECRET"], source=TEST_SCRIPTS, **dist
    ).model_copy(update={"environment": Environment(secrets={"RANK_SECRET": secret})})
    _, handle, lines = run(tmp_path, job, "hvd-hostile")
    outputs = handle.run_dir / "replicas" / "launcher-0" / "outputs"
    for rank in (0, 1):
        assert json.loads((outputs / f"argv-{rank}.json").read_text()) == [
            *HOSTILE_ARGUMENTS,
            "--print-env",
            "RANK_SECRET",
        ]
    assert not PWNED.exists()
    printed = [line.text for line in lines if "RANK_SECRET=" in line.text]
    assert len(printed) == 2 and all(text.endswith("RANK_SECRET=***") for text in printed)
    # what the runners wrote themselves (per-rank files of mpirun) is masked once the run is stopped
    for path in (handle.run_dir / "replicas" / "launcher-0" / "logs").rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes()


def test_secrets_are_on_no_command_line_and_in_no_environment_block(tmp_path, monkeypatch):
    """horovodrun with Gloo runs each rank as `env NAME=value ... python script` through a shell: a
    secret in the runner's environment would be on every rank's command line, visible to any user."""
    secret = "s3cr3t-horovod-gloo-9d"
    # Also when the task's own environment has it (the operator sets MLflow credentials there).
    monkeypatch.setenv("RANK_SECRET", secret)
    job = horovod_job(
        "pytorch", "ranks.py", ["--write-env", "RANK_SECRET", "--sleep", "3"], source=TEST_SCRIPTS
    )
    job = job.model_copy(update={"environment": Environment(secrets={"RANK_SECRET": secret})})
    launcher = LocalLauncher(work_root=tmp_path, stop_grace_seconds=3)
    handle = launcher.submit(job, launcher.plan(job, "hvd-secret"), extra_env={})
    outputs = handle.run_dir / "replicas" / "launcher-0" / "outputs"
    seen: set[int] = set()
    try:
        while not list(outputs.glob("env-*.txt")) or len(seen) < 5:
            for pid, command_line, environment in job_processes(handle):
                seen.add(pid)
                assert secret not in command_line
                assert secret not in environment
            assert launcher.poll(handle).state is JobState.RUNNING
            time.sleep(0.05)
        wait_for_job(launcher, handle, lambda line: None, timeout=60)
    finally:
        launcher.stop(handle, grace_seconds=0)
    assert [(outputs / f"env-{rank}-RANK_SECRET.txt").read_text() for rank in (0, 1)] == [secret, secret]


def job_processes(handle) -> list[tuple[int, str, str]]:
    """(pid, command line, environment values) of the run's processes still there to be read: a rank
    may end between being listed and being read."""
    processes = []
    for pid in reaper.processes_with_environment(f"DNNTRAIN_LAUNCH_ID={handle.launch_id}"):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            process = psutil.Process(pid)
            processes.append((pid, " ".join(process.cmdline()), "".join(process.environ().values())))
    return processes
