"""Run identity: unique per (dag, task, Airflow run, map index, try), stable within a try."""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 63
_HASH_LENGTH = 10


def make_run_id(dag_id: str, task_id: str, airflow_run_id: str, map_index: int, try_number: int) -> str:
    """A DNS-1123 label (lowercase alphanumerics and '-', at most 63 characters).

    The readable part is lossy (case, punctuation, truncation), so a hash of the exact identity is
    always appended: two different tries never share a run id.
    """
    identity = "\x1f".join([dag_id, task_id, airflow_run_id, str(map_index), str(try_number)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:_HASH_LENGTH]
    readable = re.sub(r"[^a-z0-9]+", "-", f"{dag_id}-{task_id}-{airflow_run_id}".lower()).strip("-")
    room = MAX_LENGTH - _HASH_LENGTH - 1 - len(f"-t{try_number}")
    readable = readable[:room].strip("-") or "run"
    return f"{readable}-t{try_number}-{digest}"


def run_id_of_try(ti, try_number: int | None = None) -> str:
    """The run id of a task instance's try (``try_number``; default: the one running)."""
    number = ti.try_number if try_number is None else try_number
    return make_run_id(ti.dag_id, ti.task_id, ti.run_id, ti.map_index, number)
