"""The Docker launcher on a real daemon (tests/docker_daemon.py), running the project's training image
(training itself: tests/operators/test_train_docker.py): secrets as files, hostile arguments literal,
outputs copied back from the chief, a replica that dies failing the job at once, a cancelled run and a
SIGKILLed task's run removed by the run's watchdog, inputs fetched from a web server into the daemon's
cache and paths of the Docker host mounted; after each, no container and no network of the run left on
the daemon."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from airflow_helpers import wait_for
from docker_daemon import TORCH_IMAGE
from launcher_jobs import run_job, wait_in_background, wait_until_ready
from object_store import ObjectStore

from airflow_provider_dnntrain.backends.base import JobFailed, OutputsLost, wait_for_job
from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher
from airflow_provider_dnntrain.spec import (
    Environment,
    Input,
    MultiWorkerMirrored,
    Resources,
    TorchDistributed,
    TrainingJob,
)

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


def test_outputs_that_cannot_be_copied_fail_the_run_unless_not_required(daemon, launcher, tmp_path, caplog):
    """A chief whose ``./outputs`` is gone at the end (here, removed by the script) cannot be copied:
    that is an error of the run, not a run without outputs."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("import shutil\nshutil.rmtree('outputs')\nprint('trained')\n")
    job = TrainingJob(framework="pytorch", source_directory=str(tmp_path / "src"), entry_script="train.py")
    handle, _ = run_job(launcher, job, "docker-lost")
    with pytest.raises(OutputsLost, match="docker-lost: the chief.s outputs were not collected: NotFound"):
        launcher.collect_outputs(handle)
    launcher.outputs_required = False
    assert (launcher.collect_outputs(handle) / "outputs").is_dir()
    assert "the chief's outputs were not collected" in caplog.text
    assert left_on(daemon, "docker-lost") == []


def test_gpus_are_asked_of_the_daemon_which_says_it_has_none_and_nothing_is_left(daemon, launcher):
    """``use_gpu``: each container asks the daemon for a GPU per process (device requests). This host
    has neither a GPU nor the NVIDIA runtime: the daemon's refusal fails the run, naming the field."""
    job = TrainingJob(
        framework="pytorch", source_directory=str(TEST_SCRIPTS), entry_script="ranks.py",
        distribution=TorchDistributed(node_count=1, process_count_per_node=2),
        resources=Resources(use_gpu=True),
    )  # fmt: skip
    with pytest.raises(RuntimeError, match=r"^resources.use_gpu: the Docker daemon gives its containers no"):
        run_job(launcher, job, "docker-gpu")
    assert left_on(daemon, "docker-gpu") == []


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


def host_address() -> str:
    """This machine's address on its own network (not a Docker bridge): where this process and the
    containers alike reach a server listening on 0.0.0.0."""
    listed = subprocess.run(
        ["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True
    )
    found = [line.split() for line in listed.stdout.splitlines()]
    return next(f[3].split("/")[0] for f in found if not f[1].startswith(("br-", "docker", "veth")))


def test_containers_fetch_downloads_once_into_the_daemon_s_cache_and_read_mounted_paths(
    daemon, launcher, tmp_path
):
    (tmp_path / "store" / "digits" / "images").mkdir(parents=True)
    (tmp_path / "store" / "digits" / "train.csv").write_text("a,b\n1,2\n")
    (tmp_path / "store" / "digits" / "images" / "0.txt").write_text("zero")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "names.txt").write_text("cat\n")
    daemon.docker("volume", "rm", "-f", "dnntrain-inputs-cache")  # kept by the daemon between sessions
    store = ObjectStore(tmp_path / "store", bind="0.0.0.0")
    try:
        job = TrainingJob(
            framework="tensorflow", source_directory=str(TEST_SCRIPTS), entry_script="reads_inputs.py",
            distribution=MultiWorkerMirrored(worker_count=2),
            inputs=[
                Input(name="digits", uri=store.url("digits/", host=host_address()), argument="--data-folder"),
                Input(name="labels", uri=f"file://{tmp_path / 'labels'}", mode="mount"),
            ],
        )  # fmt: skip
        runs = [run_job(launcher, job, f"docker-inputs-{attempt}")[1] for attempt in range(2)]
    finally:
        store.close()
    for attempt, lines in enumerate(runs):
        found = {
            line.replica: json.loads(line.text.removeprefix("inputs: "))
            for line in lines
            if line.text.startswith("inputs: ")
        }
        assert sorted(found) == ["worker-0", "worker-1"]
        for seen in found.values():
            assert seen["digits"] == {
                "path": "/dnntrain/run/inputs/digits/digits",
                "files": {"images/0.txt": "zero", "train.csv": "a,b\n1,2\n"},
            }
            assert seen["labels"] == {"path": str(tmp_path / "labels"), "files": {"names.txt": "cat\n"}}
        said = sorted(line.text for line in lines if line.text.startswith("dnntrain: input "))
        if attempt == 1:  # the first run filled the daemon's cache for both containers
            assert said == ["dnntrain: input digits: cached"] * 2
        else:
            assert len(said) == 2 and sum("fetched in" in text for text in said) == 1
        assert not any("X-Amz" in line.text or "Signature" in line.text for line in lines)
    assert store.downloads("digits/train.csv") == 1
    assert left_on(daemon, "docker-inputs-0") == left_on(daemon, "docker-inputs-1") == []


def test_on_the_host_s_network_replicas_meet_at_free_ports_of_this_host(daemon, tmp_path):
    launcher = DockerLauncher(
        docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=str(tmp_path), host_network=True,
        stop_grace_seconds=2,
    )  # fmt: skip
    job = TrainingJob(
        framework="pytorch", source_directory=str(TEST_SCRIPTS), entry_script="ranks.py",
        arguments=["--print-env", "MASTER_ADDR", "--print-env", "HOSTNAME"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1),
    )  # fmt: skip
    handle, lines = run_job(launcher, job, "docker-host-net")  # torchrun's rendezvous: node 1 reaches node 0
    said = [line.text for line in lines]
    assert {"[default0]:rank 0 MASTER_ADDR=127.0.0.1", "[default0]:rank 1 MASTER_ADDR=127.0.0.1"} <= set(said)
    assert f"[default0]:rank 1 HOSTNAME={socket.gethostname()}" in said  # the host's network: its name too
    assert handle.network is None and left_on(daemon, "docker-host-net") == []


def test_another_process_takes_a_running_job_over_from_its_state_and_logs_each_line_once(
    daemon, launcher, tmp_path
):
    job = TrainingJob(
        framework="tensorflow", source_directory=str(TEST_SCRIPTS), entry_script="replica.py",
        arguments=["--lines", "3", "--sleep", "60", "--until", "/dnntrain/run/go"],
        distribution=MultiWorkerMirrored(worker_count=2),
    )  # fmt: skip
    first = launcher.submit(job, launcher.plan(job, "docker-takeover"), extra_env={})
    seen = []
    while sum(line.text.endswith(" ready") for line in seen) < 2:
        seen += launcher.stream_logs(first, timeout=1)
    state = json.loads(json.dumps(launcher.state(first)))  # as kept in the task's state store
    # The first process is gone (no stop): another one, with a launcher of its own, takes the run over.
    taker = DockerLauncher(docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=str(tmp_path / "runs"))
    handle = taker.reattach(state, job, extra_env={})
    for container in handle.containers.values():
        daemon.docker("exec", container, "sh", "-c", "echo after > /proc/1/fd/1; touch /dnntrain/run/go")
    later = []
    status = wait_for_job(taker, handle, later.append, timeout=60)
    assert status.state.value == "succeeded"
    said = [(line.replica, line.text.strip()) for line in seen + later]
    for replica in ("worker-0", "worker-1"):
        assert said.count((replica, f"{replica} line 0")) == 1  # not again after the takeover
        assert said.count((replica, "after")) == 1  # written after it, read by the taker
    assert (taker.collect_outputs(handle) / "outputs" / "who.txt").read_text() == "worker-0"
    assert left_on(daemon, "docker-takeover") == []
