"""Run a command while three SSH hosts run on this machine (tests/ssh_hosts.py: sshd in network
namespaces on a private subnet), with the Airflow connection ``dnntrain_ssh_hosts`` naming them all.

    .venv/bin/python scripts/with_ssh_hosts.py -- airflow dags test dnntrain_ssh_pytorch_ddp

The hosts and their namespaces are removed when the command ends.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from ssh_hosts import SSHHosts  # noqa: E402


def main(command: list[str]) -> int:
    root = Path(tempfile.mkdtemp(prefix="dnntrain-ssh-hosts-"))
    try:
        with SSHHosts(root / "hosts") as hosts:
            env = {**os.environ, "AIRFLOW_CONN_DNNTRAIN_SSH_HOSTS": hosts.host_list_connection()}
            print(f"SSH hosts: {', '.join(f'{h.name} ({h.address})' for h in hosts.hosts)}", flush=True)
            return subprocess.run(command, env=env).returncode
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    arguments = sys.argv[1:]
    sys.exit(main(arguments[1:] if arguments[:1] == ["--"] else arguments))
