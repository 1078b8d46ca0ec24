"""A run's name where a backend names things after it (Kubernetes objects, Docker containers): a DNS
label that starts with a letter, short enough for ``<name>-evaluator-<index>``; a hash of the run id
keeps it unique when it is cut."""

from __future__ import annotations

import hashlib

RUN_NAME_LENGTH = 45  # room for "-<role>-<index>" in a 63-character host name


def run_label(run_id: str, length: int = RUN_NAME_LENGTH) -> str:
    name = run_id if run_id[:1].isalpha() else f"r-{run_id}"
    if len(name) > length:
        digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
        name = f"{name[: length - 11].rstrip('-')}-{digest}"
    return name
