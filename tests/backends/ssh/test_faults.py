"""The SSH launcher on a network that misbehaves for a while (tests/ssh_hosts.py): a host's link that
flaps for less than ``unreachable_timeout``, and a host's sshd restarted mid-run. Neither may fail the
job, lose a line or log one twice."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from ssh_hosts import SSHHosts

from airflow_provider_dnntrain.backends.base import JobState, wait_for_job
from airflow_provider_dnntrain.backends.ssh.launcher import SSHLauncher
from airflow_provider_dnntrain.spec import MultiWorkerMirrored, TrainingJob

TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TICKS = 40


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with SSHHosts(tmp_path_factory.mktemp("ssh") / "hosts", count=2) as started:  # broken on purpose
        yield started


@pytest.fixture
def launcher(hosts, monkeypatch, tmp_path):
    for index, host in enumerate(hosts.hosts):
        monkeypatch.setenv(f"AIRFLOW_CONN_SSH_H{index}", hosts.airflow_connection(host))
    ids = [f"ssh_h{index}" for index in range(len(hosts.hosts))]
    return SSHLauncher(ssh_conn_ids=ids, work_root=str(tmp_path), unreachable_timeout=30, poll_interval=0.5)


def ticking_job() -> TrainingJob:
    """A replica on each host, printing a numbered line every half second for 20 s."""
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="ranks.py",
        arguments=["--ticks", str(TICKS)],
        distribution=MultiWorkerMirrored(worker_count=2),
    )


def run_disturbed(launcher, run_id: str, disturb) -> tuple[list, list[float]]:
    """The job, with ``disturb()`` run once both replicas are ready; every line logged, and when each
    was (monotonic)."""
    job = ticking_job()
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    lines, arrived, disturbed = [], [], []

    def logged(line) -> None:
        lines.append(line)
        arrived.append(time.monotonic())

    def when_ready() -> None:
        try:
            while sum(line.text.endswith(" ready") for line in list(lines)) < 2:
                time.sleep(0.1)
            disturb()
            disturbed.append(True)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            disturbed.append(error)

    thread = threading.Thread(target=when_ready, daemon=True)
    thread.start()
    status = wait_for_job(launcher, handle, logged, timeout=180)
    thread.join(timeout=30)
    print("\n".join(map(str, lines)))
    assert disturbed == [True], disturbed
    assert status.state is JobState.SUCCEEDED, status
    return lines, arrived


def assert_every_tick_once(lines: list) -> None:
    for replica in ("worker-0", "worker-1"):
        ticks = [line.text for line in lines if line.replica == replica and " tick " in line.text]
        assert ticks == [f"rank {replica} tick {tick} of {TICKS}" for tick in range(TICKS)], replica


def test_a_link_down_for_10_s_fails_nothing_and_loses_no_line(hosts, launcher):
    flapping = hosts.hosts[1]

    def flap() -> None:
        hosts.cut_off(flapping)
        time.sleep(10)
        hosts.reconnect(flapping)

    lines, arrived = run_disturbed(launcher, "ssh-link-flap", flap)
    assert_every_tick_once(lines)
    of_the_host = [when for line, when in zip(lines, arrived, strict=True) if line.replica == "worker-1"]
    gaps = [later - earlier for earlier, later in zip(of_the_host, of_the_host[1:], strict=False)]
    assert max(gaps) > 8  # its lines were held while the link was down, then came, each once


def test_an_sshd_restarted_mid_run_fails_nothing_and_loses_no_line(hosts, launcher):
    restarted, killed = hosts.hosts[1], []
    lines, _ = run_disturbed(
        launcher, "ssh-sshd-restart", lambda: killed.extend(hosts.restart_sshd(restarted, 3))
    )
    assert len(killed) > 1  # the listener and the launcher's session: its connection dropped
    assert_every_tick_once(lines)
