"""Where the launcher interface was imported from before the backends had packages; it is
``backends/base.py`` now."""

from airflow_provider_dnntrain.backends.base import (
    JobFailed,
    JobHandle,
    JobState,
    JobStatus,
    Launcher,
    LogLine,
    wait_for_job,
)

__all__ = ["JobFailed", "JobHandle", "JobState", "JobStatus", "Launcher", "LogLine", "wait_for_job"]
