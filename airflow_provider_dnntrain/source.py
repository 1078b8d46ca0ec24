"""The job's code: checking it is there, and snapshotting it for a run."""

from __future__ import annotations

import shutil
from pathlib import Path

from airflow_provider_dnntrain.spec import TrainingJob

_NEVER_SNAPSHOT = shutil.ignore_patterns("__pycache__", "*.pyc", ".git", ".ipynb_checkpoints")


def check_source(job: TrainingJob) -> Path:
    """The resolved source directory; ``ValueError`` naming the field if it or the script is missing."""
    source = Path(job.source_directory).expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"source_directory: {str(source)!r} is not a directory")
    if not (source / job.entry_script).is_file():
        raise ValueError(f"entry_script: {job.entry_script!r} is not a file in {source}")
    return source


def snapshot(source: Path, destination: Path) -> None:
    """Copy ``source`` to ``destination``, without caches, and without a top-level outputs/ or logs/
    left by a manual run: each run starts with its own."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = set(_NEVER_SNAPSHOT(folder, names))
        if Path(folder) == source:
            skipped |= {"outputs", "logs"} & set(names)
        return skipped

    shutil.copytree(source, destination, ignore=ignore)
