"""A Kubernetes run's Secrets (pure): the job's variables and the SSH files of a runner's nodes in the
run's Secret, the containers' references to them, and the image pull Secret of a run whose registry
has credentials."""

from __future__ import annotations

import base64
from collections.abc import Mapping

PULL_SECRET_TYPE, PULL_KEY = "kubernetes.io/dockerconfigjson", ".dockerconfigjson"


def pull_secret_name(job: str) -> str:
    return f"{job}-pull"


def secret_object(name: str, meta: dict, kind: str, values: Mapping[str, str]) -> dict:
    data = {k: base64.b64encode(v.encode()).decode() for k, v in sorted(values.items())}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, **meta},
        "type": kind,
        "data": data,
    }


def secret_key(variable: str) -> str:
    return f"env.{variable}"


def secret_data(values: Mapping[str, str], ssh_files: Mapping[str, str]) -> dict[str, str]:
    """The run's Secret: the job's variables under ``env.<NAME>``, SSH files under ``ssh.<name>``."""
    return {**{secret_key(k): v for k, v in values.items()}, **{f"ssh.{k}": v for k, v in ssh_files.items()}}
