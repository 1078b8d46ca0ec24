"""The SSH test hosts themselves (tests/ssh_hosts.py): what the multi-host launcher tests stand on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from base64 import b64decode

import paramiko
import pytest
from airflow.providers.ssh.hooks.ssh import SSHHook
from ssh_hosts import SSHHosts


@pytest.fixture
def hosts(tmp_path):
    with SSHHosts(tmp_path / "hosts") as started:
        yield started


def connection(monkeypatch, conn_id: str, hosts: SSHHosts, port: int, host_key: str) -> SSHHook:
    extra = {"key_file": str(hosts.client_key), "host_key": host_key, "no_host_key_check": False}
    uri = {"conn_type": "ssh", "host": "127.0.0.1", "port": port, "login": hosts.user, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(uri))
    return SSHHook(ssh_conn_id=conn_id, cmd_timeout=30)


def run(hook: SSHHook, command: str) -> str:
    with hook.get_conn() as client:
        status, out, err = hook.exec_ssh_client_command(client, command, get_pty=False, environment=None)
    assert status == 0, err.decode()
    return out.decode().strip()


def test_each_host_has_its_own_name_and_reaches_the_others_over_the_subnet(hosts, monkeypatch):
    names = {h.name for h in hosts.hosts}
    assert len(names) == 3
    for index, host in enumerate(hosts.hosts):
        hook = connection(monkeypatch, f"ssh_h{index}", hosts, host.port, host.host_key)
        # The project's interpreter by absolute path: sshd's PATH is the default one.
        assert run(hook, f"{sys.executable} -c 'import socket; print(socket.gethostname())'") == host.name
        peer = hosts.hosts[(index + 1) % len(hosts.hosts)]
        ssh = f"ssh -i {hosts.client_key} -o UserKnownHostsFile={hosts.known_hosts} -o BatchMode=yes"
        assert run(hook, f"{ssh} {peer.name} hostname") == peer.name  # by name, key checked
        assert run(hook, f"{ssh} {peer.address} hostname") == peer.name


def test_every_host_has_its_own_host_key(hosts):
    """So a test can pin one host's key and see another host refused."""
    first, second = hosts.hosts[:2]
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    key_type, key = second.host_key.split()
    pinned = paramiko.Ed25519Key(data=b64decode(key))
    client.get_host_keys().add(f"[127.0.0.1]:{first.port}", key_type, pinned)
    with pytest.raises(paramiko.BadHostKeyException):
        client.connect("127.0.0.1", first.port, hosts.user, key_filename=str(hosts.client_key), timeout=10)
    assert len({h.host_key for h in hosts.hosts}) == len(hosts.hosts)


def test_stopping_leaves_no_namespace_and_no_process(tmp_path):
    with SSHHosts(tmp_path / "other") as other:  # another set at the same time is left alone
        hosts = SSHHosts(tmp_path / "hosts").start()
        sshd_pids = [h.sshd.pid for h in hosts.hosts]
        sleeper = subprocess.Popen(  # a process left on a host, as a detached job would be
            ["ip", "netns", "exec", hosts.hosts[0].namespace, "sleep", "600"], start_new_session=True
        )
        deadline = time.monotonic() + 10
        while sleeper.pid not in hosts.hosts[0].pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeper.pid in hosts.hosts[0].pids()
        assert sleeper.pid not in hosts.hosts[1].pids()
        hosts.stop()
        assert sleeper.wait(timeout=10) != 0
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert hosts.prefix not in listed
        for pid in sshd_pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        assert other.prefix in listed and all(h.sshd.poll() is None for h in other.hosts)
