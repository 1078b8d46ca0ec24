"""The SSH launcher against real sshd hosts (tests/ssh_hosts.py): every replica on a host of its own."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
from azure_script import assert_ran_as_azure_ml_script_offline
from long_lines import assert_lines_whole_bounded_and_throttled, long_lines_job
from object_store import ObjectStore
from ssh_hosts import SSHHosts

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.backends.ssh import peers as ssh_peers
from airflow_provider_dnntrain.backends.ssh.launcher import SSHLauncher
from airflow_provider_dnntrain.spec import Horovod, Input, MultiWorkerMirrored, TorchDistributed, TrainingJob

EXAMPLE_SCRIPTS = Path(__file__).resolve().parents[3] / "dags" / "scripts"
TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts") as started:
        yield started


@pytest.fixture
def conn_ids(hosts, monkeypatch):
    ids = []
    for index, host in enumerate(hosts.hosts):
        monkeypatch.setenv(f"AIRFLOW_CONN_SSH_H{index}", hosts.airflow_connection(host))
        ids.append(f"ssh_h{index}")
    return ids


@pytest.mark.slow
@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_torchrun_two_nodes_on_two_hosts(tmp_path, conn_ids, hosts, rendezvous):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_ddp_digits.py",
        arguments=["--epochs", "2"],
        distribution=TorchDistributed(node_count=2, process_count_per_node=1, rendezvous=rendezvous),
    )
    launcher = SSHLauncher(ssh_conn_ids=conn_ids, work_root=str(tmp_path))
    handle = launcher.submit(job, launcher.plan(job, f"ssh-ddp-{rendezvous}-{tmp_path.name}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=240)
    print("\n".join(map(str, lines)))
    text = {n: "\n".join(line.text for line in lines if line.replica == n) for n in ("node-0", "node-1")}
    ranks = {name: re.search(r"rank=(\d) world_size=2", t).group(1) for name, t in text.items()}
    assert sorted(ranks.values()) == ["0", "1"]
    checksums = {name: re.search(r"weights_checksum=(\S+)", t).group(1) for name, t in text.items()}
    assert checksums["node-0"] == checksums["node-1"]
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["allreduce_sum"] == 3.0
    assert {r.host for r in handle.plan.replicas} == {hosts.hosts[0].address, hosts.hosts[1].address}
    for host in hosts.hosts:
        assert host.job_processes() == {}, host.name


def rank_lines(lines, rank: int) -> list[str]:
    """A rank's lines, whichever way the runner labels them (per-rank files or horovodrun's prefix)."""
    by_file = [line.text for line in lines if line.replica.endswith(f"/rank.{rank}")]
    by_prefix = [line.text.split(":", 1)[1] for line in lines if line.text.startswith(f"[{rank}]<stdout>:")]
    return by_file + by_prefix


@pytest.mark.slow
@pytest.mark.parametrize(
    "dist",
    [{"runner": "mpirun", "controller": "mpi"}, {"controller": "mpi"}],
    ids=["mpirun", "horovodrun-mpi"],  # horovodrun over Gloo: through dag.test in test_train_ssh.py
)
def test_horovod_two_nodes_on_two_hosts_allreduce(tmp_path, conn_ids, hosts, dist):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(EXAMPLE_SCRIPTS),
        entry_script="torch_horovod_digits.py",
        arguments=["--epochs", "2"],
        distribution=Horovod(node_count=2, process_count_per_node=1, network_interface="eth0", **dist),
    )
    launcher = SSHLauncher(ssh_conn_ids=conn_ids, work_root=str(tmp_path), stop_grace_seconds=3)
    handle = launcher.submit(job, launcher.plan(job, f"ssh-hvd-{tmp_path.name}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=300)
    print("\n".join(map(str, lines)))
    for rank, host in zip((0, 1), hosts.hosts[:2], strict=True):  # mpirun fills the first host first
        mine = "\n".join(rank_lines(lines, rank))
        assert f"rank={rank} size=2" in mine and "allreduce_sum=3.0" in mine
        assert f"host={host.name}" in mine
    facts = json.loads((launcher.collect_outputs(handle) / "outputs" / "summary.json").read_text())
    assert facts["size"] == 2 and facts["allreduce_sum"] == 3.0
    assert handle.plan.hosts == [h.address for h in hosts.hosts[:2]]
    assert ssh_peers.key_marker(handle.launch_id) not in (hosts.root / "authorized_keys").read_text()
    for host in hosts.hosts:
        assert host.job_processes() == {}, host.name


def test_progress_bars_and_long_lines_read_like_on_every_backend(tmp_path, conn_ids):
    job = long_lines_job()
    launcher = SSHLauncher(ssh_conn_ids=conn_ids[:1], work_root=str(tmp_path))
    handle = launcher.submit(job, launcher.plan(job, f"ssh-long-lines-{tmp_path.name}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=120)
    assert_lines_whole_bounded_and_throttled([line.text for line in lines])


def test_a_host_runs_the_interpreter_its_connection_names(tmp_path, hosts, monkeypatch):
    own = tmp_path / "bin" / "python"  # the hosts share this machine's file system
    own.parent.mkdir()
    own.write_text(
        f'#!/bin/sh\nexport STARTED_BY="$(cat /proc/sys/kernel/hostname)"\nexec {sys.executable} "$@"\n'
    )
    own.chmod(0o755)
    for index, host in enumerate(hosts.hosts[:2]):
        extra = {"python": str(own)} if index == 1 else {}
        monkeypatch.setenv(f"AIRFLOW_CONN_SSH_H{index}", hosts.airflow_connection(host, **extra))
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="ranks.py",
        arguments=["--print-env", "STARTED_BY", "--print-env", "DNNTRAIN_INPUT_DIGITS"],
        distribution=MultiWorkerMirrored(worker_count=2),
        inputs=[Input(name="digits", path=str(tmp_path / "shared data"), argument="--data")],
    )
    launcher = SSHLauncher(ssh_conn_ids=["ssh_h0", "ssh_h1"], work_root=str(tmp_path))
    handle = launcher.submit(job, launcher.plan(job, f"ssh-python-{tmp_path.name}"), extra_env={})
    assert [r.argv[0] for r in handle.plan.replicas] == [sys.executable, str(own)]
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=60)
    artifacts = launcher.collect_outputs(handle)
    said = {line.replica: line.text for line in lines if "STARTED_BY=" in line.text}
    assert said == {
        "worker-0": "rank worker-0 STARTED_BY=None",
        "worker-1": f"rank worker-1 STARTED_BY={hosts.hosts[1].name}",
    }
    # An input's path reaches every replica as given (a shared file system), by variable and argument.
    data = str(tmp_path / "shared data")
    for name in ("worker-0", "worker-1"):
        assert f"rank {name} DNNTRAIN_INPUT_DIGITS={data}" in [line.text for line in lines]
    assert json.loads((artifacts / "outputs" / "argv-worker-0.json").read_text())[-2:] == ["--data", data]
    # Horovod's runner starts every rank with its own command line: one interpreter path for all.
    horovod = job.model_copy(update={"framework": "pytorch", "distribution": Horovod(node_count=2)})
    with pytest.raises(ValueError, match="python: horovod's runner starts every rank with one command line"):
        launcher.plan(horovod, "ssh-python-horovod")


@pytest.mark.slow
def test_a_script_written_for_azure_ml_finds_its_run_on_the_host(tmp_path, conn_ids):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="azure_style.py",
        azureml_compat=True,
    )
    launcher = SSHLauncher(ssh_conn_ids=conn_ids[:1], work_root=str(tmp_path))
    handle = launcher.submit(job, launcher.plan(job, f"ssh-azure-{tmp_path.name}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=120)
    print("\n".join(map(str, lines)))
    assert_ran_as_azure_ml_script_offline(lines)


@pytest.mark.slow
def test_a_gpu_job_is_refused_on_hosts_without_gpus_before_anything_ships(tmp_path, conn_ids, hosts):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="replica.py",
        distribution=TorchDistributed(node_count=2, process_count_per_node=2),
        resources={"use_gpu": True},
    )
    launcher = SSHLauncher(ssh_conn_ids=conn_ids, work_root=str(tmp_path))
    with pytest.raises(ValueError) as refused:
        launcher.submit(job, launcher.plan(job, f"ssh-gpu-{tmp_path.name}"), extra_env={})
    message = str(refused.value)
    assert message.startswith("use_gpu: the job needs 2 GPU(s) on host ")
    assert "(node-0: 0,1), which has 0; " in message and "exited 127" in message  # nvidia-smi: not found
    for host in hosts.hosts:
        assert host.job_processes() == {}, host.name


@pytest.mark.slow
def test_a_job_runs_in_its_environment_built_on_the_host(tmp_path, conn_ids):
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(TEST_SCRIPTS),
        entry_script="uses_package.py",
        environment={"pip_packages": ["pyjokes==0.8.3"]},
    )
    # The test hosts have no route to the package index: wheels on the disk they share, as a site
    # without the internet would give them.
    wheels = tmp_path / "wheels"
    download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(wheels)]
    subprocess.run([*download, "pyjokes==0.8.3"], check=True, timeout=300)
    remote = tmp_path / "remote"
    launcher = SSHLauncher(
        ssh_conn_ids=conn_ids[:1],
        work_root=str(tmp_path),
        remote_root=str(remote / "runs"),
        uv_settings={"UV_FIND_LINKS": str(wheels), "UV_OFFLINE": "1"},
    )
    handle = launcher.submit(job, launcher.plan(job, f"ssh-env-{tmp_path.name}"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=300)
    print("\n".join(map(str, lines)))
    (line,) = [line.text for line in lines if line.text.startswith("pyjokes 0.8.3 psutil ")]
    assert f"python {remote / 'environments'}/" in line  # the environment built on the host
    record = launcher.collect_outputs(handle) / "logs" / "environment.txt"
    assert "pyjokes==0.8.3" in record.read_text()


@contextlib.contextmanager
def logged(name: str):
    """The records one logger emits meanwhile (whatever Airflow did to logging's configuration)."""
    records, handler, logger = [], logging.Handler(logging.INFO), logging.getLogger(name)
    handler.emit = records.append
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@pytest.mark.slow
def test_downloaded_inputs_reach_every_host_once_and_are_cached_there(tmp_path, conn_ids, hosts):
    (tmp_path / "store" / "digits" / "images").mkdir(parents=True)
    (tmp_path / "store" / "digits" / "train.csv").write_text("a,b\n1,2\n")
    (tmp_path / "store" / "digits" / "images" / "0.txt").write_text("zero")
    store = ObjectStore(tmp_path / "store")
    job = TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="reads_inputs.py",
        distribution=MultiWorkerMirrored(worker_count=2),
        inputs=[
            Input(name="digits", uri=store.url("digits/"), argument="--data-folder"),
            Input(name="labels", uri=(tmp_path / "store" / "digits" / "train.csv").as_uri()),
        ],
    )
    remote = tmp_path / "remote"
    launcher = SSHLauncher(
        ssh_conn_ids=conn_ids,
        work_root=str(tmp_path / "worker"),
        remote_root=str(remote / "runs"),
        inputs_root=str(tmp_path / "worker-cache"),
    )
    found = []
    try:
        for attempt in range(2):
            with logged("airflow_provider_dnntrain.backends.ssh.shipping") as records:
                handle = launcher.submit(job, launcher.plan(job, f"ssh-inputs-{attempt}"), extra_env={})
            said = "\n".join(record.getMessage() for record in records)
            lines = []
            wait_for_job(launcher, handle, lines.append, timeout=120)
            print("\n".join(map(str, lines)))
            found.append(
                {
                    line.replica: json.loads(line.text[len("inputs: ") :])
                    for line in lines
                    if line.text.startswith("inputs: ")
                }
            )
            how = "put on" if attempt == 0 else "cached on"
            for host in hosts.hosts[:2]:  # the two the workers run on
                for name in ("digits", "labels"):
                    assert f"Input {name}: {how} host {host.address} " in said, (name, host.address)
            launcher.collect_outputs(handle)
    finally:
        store.close()
    for attempt, run in enumerate(found):
        assert sorted(run) == ["worker-0", "worker-1"]
        for seen in run.values():
            assert seen["digits"]["files"] == {"images/0.txt": "zero", "train.csv": "a,b\n1,2\n"}
            assert seen["digits"]["path"] == f"{remote}/runs/ssh-inputs-{attempt}/inputs/digits/digits"
            assert seen["labels"]["files"] == {"train.csv": "a,b\n1,2\n"}
    assert store.downloads("digits/train.csv") == 1  # fetched once by the worker, then from its cache
    cached = [p.name for p in (remote / "inputs").iterdir() if not p.name.endswith(".lock")]
    assert len(cached) == 2  # one entry per input, though both hosts share the disk here
