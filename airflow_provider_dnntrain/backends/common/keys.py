"""SSH keys made for one run (never a user's own): the runners' host-to-host logins on SSH hosts and
between a Horovod job's pods or containers."""

from __future__ import annotations


def ed25519_pair() -> tuple[str, str]:
    """A fresh Ed25519 key: (private key in OpenSSH format, public key as an OpenSSH line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private.decode(), public.decode()


def run_ssh_files(name: str) -> dict[str, str]:
    """A key pair and a host key for the run ``name`` only, whose nodes are ``<name>-*`` (or in the
    domain ``<name>``): the files a runner's node and the nodes it reaches read, in ``/dnntrain/ssh``."""
    client_key, client_public = ed25519_pair()
    host_key, host_public = ed25519_pair()
    return {
        "id": client_key,
        "authorized_keys": f"{client_public} dnntrain-{name}\n",
        "host_key": host_key,
        "known_hosts": f"*.{name},{name}-* {host_public}\n",
    }
