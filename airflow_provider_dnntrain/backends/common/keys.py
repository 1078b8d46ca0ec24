"""SSH keys made for one run (never a user's own): the runners' host-to-host logins on SSH hosts and
between a Horovod job's pods."""

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
