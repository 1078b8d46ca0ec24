"""What a Kubernetes run ships besides its manifests and its bundle (``common/bundle.py``, which its
ConfigMap carries): the SSH keys made for it."""

from __future__ import annotations

from airflow_provider_dnntrain.backends.common.keys import ed25519_pair


def ssh_files(job: str) -> dict[str, str]:
    """A key pair and a host key for this run only (deleted with its Secret)."""
    client_key, client_public = ed25519_pair()
    host_key, host_public = ed25519_pair()
    return {
        "id": client_key,
        "authorized_keys": f"{client_public} dnntrain-{job}\n",
        "host_key": host_key,
        "known_hosts": f"*.{job},{job}-* {host_public}\n",
    }
