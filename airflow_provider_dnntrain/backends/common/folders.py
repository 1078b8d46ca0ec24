"""Where the Airflow worker keeps what backends make: runs' folders, built environments and fetched
inputs, side by side under ``$AIRFLOW_HOME/dnntrain``."""

from __future__ import annotations

import os
from pathlib import Path


def default_work_root() -> Path:
    """Where a run's files live on the Airflow worker: its snapshot, plan, logs and artifacts."""
    home = os.environ.get("AIRFLOW_HOME") or os.path.expanduser("~/airflow")
    return Path(home) / "dnntrain" / "runs"


def beside_runs(name: str) -> Path:
    """A cache shared by every run on this worker (``environments``, ``inputs``), beside the runs."""
    return default_work_root().parent / name
