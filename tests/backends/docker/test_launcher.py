"""The Docker launcher on a real daemon (tests/docker_daemon.py), running the project's training image
(training itself: tests/operators/test_train_docker.py): secrets as files, hostile arguments literal,
outputs copied back from the chief, a replica that dies failing the job at once, a cancelled run and a
SIGKILLed task's run removed by the run's watchdog; after each, no container and no network of the run
left on the daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from airflow_helpers import wait_for
from docker_daemon import TORCH_IMAGE
from launcher_jobs import run_job, wait_in_background, wait_until_ready

from airflow_provider_dnntrain.backends.base import JobFailed
from airflow_provider_dnntrain.spec import Environment, MultiWorkerMirrored, TrainingJob

TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
HOSTILE = "$(touch /tmp/pwned); `id` ' \" ; rm -rf /"


def left_on(daemon, run_id: str) -> list[str]:
    containers, networks = daemon.held(run_id)
    return containers + networks


def test_secrets_are_files_not_in_inspect_and_arguments_arrive_literally(daemon, launcher):
    secret = "s3cr3t-value-never-shown"
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--print-env", "API_TOKEN", "--sleep", "30", "--until", "/dnntrain/run/go", HOSTILE],
        distribution=MultiWorkerMirrored(worker_count=2),
        environment=Environment(secrets={"API_TOKEN": secret}),
    )
    handle = launcher.submit(job, launcher.plan(job, "docker-secret"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, 2)
    inspected = daemon.docker("inspect", *handle.containers.values()).stdout
    assert secret not in inspected
    assert HOSTILE in json.loads(inspected)[0]["Args"]  # one argument, as given
    for container in handle.containers.values():
        daemon.docker("exec", container, "touch", "/dnntrain/run/go")
    thread.join(60)
    assert "status" in outcome, outcome
    said = "\n".join(line.text for line in lines)
    assert "API_TOKEN=***" in said and secret not in said  # the script had it; the log masks it
    outputs = launcher.collect_outputs(handle) / "outputs"
    assert json.loads((outputs / "argv.json").read_text())[-1] == HOSTILE
    assert secret not in (outputs / "env.json").read_text()
    assert left_on(daemon, "docker-secret") == []


def test_a_replica_that_dies_fails_the_job_at_once_and_nothing_is_left(daemon, launcher):
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--sleep", "1", "--fail", "worker-1:3", "--serve", "worker-0"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )
    started = time.monotonic()
    with pytest.raises(JobFailed, match="replica worker-1 failed with exit code 3") as failed:
        run_job(launcher, job, "docker-fail")
    assert time.monotonic() - started < 30
    assert "worker-1 about to fail" in str(failed.value)
    assert left_on(daemon, "docker-fail") == []


def test_a_cancelled_run_is_ended_by_the_daemon_and_stop_removes_it(daemon, launcher):
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        arguments=["--serve", "worker-0", "--serve", "worker-1"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )
    handle = launcher.submit(job, launcher.plan(job, "docker-cancel"), extra_env={})
    thread, lines, outcome = wait_in_background(launcher, handle)
    wait_until_ready(lines, 2)
    launcher.cancel(handle)
    thread.join(60)
    assert "error" in outcome and "cancelled" in str(outcome["error"])
    assert left_on(daemon, "docker-cancel") == []


def test_a_sigkilled_task_s_run_is_removed_by_its_watchdog(daemon, tmp_path):
    """The task process SIGKILLed mid-run: nobody renews the run's lease, and its watchdog removes every
    container and the network once it has lapsed (here 4 s)."""
    script = textwrap.dedent(f"""
        from airflow_provider_dnntrain.backends.base import wait_for_job
        from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher
        from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TrainingJob
        launcher = DockerLauncher(
            docker_url={daemon.base_url!r}, work_root={str(tmp_path)!r}, orphan_timeout=4, lease_interval=1,
            stop_grace_seconds=2, image={TORCH_IMAGE!r},
        )
        job = TrainingJob(
            framework="tensorflow", source_directory={str(TEST_SCRIPTS)!r}, entry_script="replica.py",
            arguments=["--serve", "worker-0", "--serve", "worker-1"],
            distribution=MultiWorkerMirrored(worker_count=2),
        )
        handle = launcher.submit(job, launcher.plan(job, "docker-orphan"), extra_env={{}})
        wait_for_job(launcher, handle, lambda line: print(line, flush=True))
    """)
    task = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    ready = 0
    for line in task.stdout:
        ready += " ready" in line
        if ready == 2:
            break
    assert len(left_on(daemon, "docker-orphan")) == 4  # two replicas, the watchdog, the network
    task.kill()
    task.wait()
    killed = time.monotonic()
    wait_for(lambda: not left_on(daemon, "docker-orphan"), 30, "the watchdog to remove the run")
    assert time.monotonic() - killed > 3  # not before the lease lapsed
