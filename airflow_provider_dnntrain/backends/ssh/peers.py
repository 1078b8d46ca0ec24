"""SSH between the hosts of one run, for the runners that start ranks over SSH (mpirun, horovodrun).

The launcher makes a key pair per run (never the user's own keys), authorizes its public half on every
host for the run only (``restrict``ed, expiring, removed when the run ends), and hands the hosts a
known-hosts file holding the keys it verified itself when it connected: host-to-host connections are
checked as strictly as its own. An ``ssh`` wrapper leading the runners' PATH applies all of it, ahead of
any option a runner passes (horovodrun turns host key checking off on its command line).
"""

from __future__ import annotations

import datetime
import posixpath

from airflow_provider_dnntrain.backends.common.keys import ed25519_pair
from airflow_provider_dnntrain.backends.ssh.remote import RemoteHost

KEY_FILE = "ssh/id_ed25519"
KNOWN_HOSTS_FILE = "ssh/known_hosts"
CONFIG_FILE = "ssh/config"
# The key is needed while runners connect, at the start; this bounds a key a killed task left behind.
KEY_LIFETIME = datetime.timedelta(days=2)


def key_marker(launch_id: str) -> str:
    return f"dnntrain-run-{launch_id}"


def run_key_pair(launch_id: str) -> tuple[bytes, str]:
    """(private key in OpenSSH format, authorized_keys line) of a fresh Ed25519 key for one run."""
    private, public = ed25519_pair()
    expiry = (datetime.datetime.now(datetime.UTC) + KEY_LIFETIME).strftime("%Y%m%d%H%MZ")
    line = f'restrict,expiry-time="{expiry}" {public} {key_marker(launch_id)}'
    return private.encode(), line


def peer_port(host: RemoteHost) -> int:
    """The port the other hosts reach this host's sshd at: 22 when the connection names a separate
    peer address (this worker may come through a tunnel or a forward), else the connection's port."""
    spec = host.spec
    if spec.peer_port:
        return spec.peer_port
    return 22 if spec.address else (spec.port or 22)


def known_hosts(hosts: list[RemoteHost]) -> str:
    """Every host under its peer address, with the key this worker verified when it connected."""
    lines = []
    for host in hosts:
        key = host.client.get_transport().get_remote_server_key()
        port = peer_port(host)
        name = host.spec.peer_address if port == 22 else f"[{host.spec.peer_address}]:{port}"
        lines.append(f"{name} {key.get_name()} {key.get_base64()}\n")
    return "".join(lines)


def ssh_config(hosts: list[RemoteHost], job_dir: str) -> str:
    entries = [f"Host {h.spec.peer_address}\n  Port {peer_port(h)}\n" for h in hosts]
    return "".join(entries) + (
        "Host *\n"
        f"  IdentityFile {posixpath.join(job_dir, KEY_FILE)}\n"
        "  IdentitiesOnly yes\n"
        f"  UserKnownHostsFile {posixpath.join(job_dir, KNOWN_HOSTS_FILE)}\n"
        "  GlobalKnownHostsFile /dev/null\n"
        "  StrictHostKeyChecking yes\n"
        "  BatchMode yes\n"
        "  ConnectTimeout 10\n"
        "  ServerAliveInterval 5\n"
    )


def grant(hosts: list[RemoteHost], job_dir: str, launch_id: str) -> str:
    """Upload the run's key, known hosts and ssh config to every host; return the authorized_keys line
    the agent adds there."""
    private, authorized = run_key_pair(launch_id)
    trusted = known_hosts(hosts).encode()
    config = ssh_config(hosts, job_dir).encode()
    for host in hosts:
        host.makedirs(posixpath.join(job_dir, "ssh"))
        host.put(private, posixpath.join(job_dir, KEY_FILE))
        host.put(trusted, posixpath.join(job_dir, KNOWN_HOSTS_FILE))
        host.put(config, posixpath.join(job_dir, CONFIG_FILE))
    return authorized
