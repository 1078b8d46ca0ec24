"""The job's code: checking it is there, and snapshotting it for a run."""

from __future__ import annotations

import fnmatch
import logging
import os
import shutil
from pathlib import Path

from airflow_provider_dnntrain.spec import RESUME_FOLDER, TrainingJob

log = logging.getLogger(__name__)

IGNORE_FILE = ".dnntrainignore"  # gitignore syntax, as Azure ML's .amlignore
LARGE_SNAPSHOT_BYTES = 300 * 1024 * 1024  # Azure ML warned above this size too
_NEVER_SNAPSHOT = ("__pycache__", "*.pyc", ".git", ".ipynb_checkpoints")


def check_source(job: TrainingJob) -> Path:
    """The resolved source directory; ``ValueError`` naming the field if it or the script is missing."""
    source = Path(job.source_directory).expanduser().resolve()
    if not source.is_dir():
        raise ValueError(f"source_directory: {str(source)!r} is not a directory")
    if not (source / job.entry_script).is_file():
        raise ValueError(f"entry_script: {job.entry_script!r} is not a file in {source}")
    requirements = job.environment.requirements_file
    if requirements and not (source / requirements).is_file():
        raise ValueError(f"environment.requirements_file: {requirements!r} is not a file in {source}")
    return source


def snapshot(source: Path, destination: Path, resume: str | None = None) -> int:
    """Copy ``source`` to ``destination`` without what its ``.dnntrainignore`` lists, caches, and a
    top-level outputs/ or logs/ left by a manual run (each run starts with its own); the bytes copied.
    ``resume``: an earlier run's outputs, copied in as ``resume/`` (every backend ships the snapshot).
    A large snapshot is copied anyway, with a warning that says how large it is."""
    source = source.resolve()
    ignored = _ignore_spec(source)
    copied = 0
    for folder, dirs, files in os.walk(source, followlinks=True):
        relative = Path(folder).relative_to(source)
        dirs[:] = sorted(d for d in dirs if not _skipped(relative / d, True, ignored))
        files = [name for name in files if not _skipped(relative / name, False, ignored)]
        for name in [*dirs, *files]:
            _refuse_link_out(source, relative / name)
        (destination / relative).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copy2(Path(folder) / name, destination / relative / name)
            copied += (destination / relative / name).stat().st_size
    if resume:
        shutil.rmtree(destination / RESUME_FOLDER, ignore_errors=True)
        shutil.copytree(resume, destination / RESUME_FOLDER)
        copied += sum(f.stat().st_size for f in (destination / RESUME_FOLDER).rglob("*") if f.is_file())
    if copied > LARGE_SNAPSHOT_BYTES:
        log.warning(
            "source_directory: the snapshot of %s is %.0f MB (more than %d MB), copied for every run; "
            "list what the job does not need (data, checkpoints) in %s",
            source,
            copied / 2**20,
            LARGE_SNAPSHOT_BYTES // 2**20,
            source / IGNORE_FILE,
        )
    return copied


def _refuse_link_out(source: Path, relative: Path) -> None:
    """A symbolic link is followed only where it stays inside the source directory: one that leads out
    (a home directory, ``~/.ssh``) would ship what it leads to to every replica."""
    path = source / relative
    if path.is_symlink() and not path.resolve().is_relative_to(source):
        raise ValueError(
            f"source_directory: {relative.as_posix()} links to {path.resolve()}, outside {source}; copy "
            f"what the job needs into the source directory, or list the link in {IGNORE_FILE}"
        )


def _ignore_spec(source: Path):
    import pathspec

    listing = source / IGNORE_FILE
    lines = listing.read_text().splitlines() if listing.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _skipped(relative: Path, is_dir: bool, ignored) -> bool:
    if any(fnmatch.fnmatch(relative.name, pattern) for pattern in _NEVER_SNAPSHOT):
        return True
    if is_dir and relative.parts in (("outputs",), ("logs",)):
        return True
    return ignored.match_file(f"{relative.as_posix()}/" if is_dir else relative.as_posix())
