"""A job that outlives the task process, kept for the task's next try: its launcher's state (JSON, no
secrets) in the task instance's ``task_state_store``, as Airflow's ``ResumableJobMixin`` keeps external
job ids, so that a try after a dead worker takes the running job over instead of starting a second."""

from __future__ import annotations

from airflow_provider_dnntrain.backends.base import JobHandle, Launcher

_JOB_STATE_KEY = "dnntrain_job"


def _outlives_the_task(launcher: Launcher) -> bool:
    return type(launcher).state is not Launcher.state


def saved_job(context, launcher: Launcher) -> dict | None:
    """The job an earlier try of this task instance left running, if ``launcher`` can take it over."""
    store = context.get("task_state_store")
    if store is None or not _outlives_the_task(launcher):
        return None
    return store.get(_JOB_STATE_KEY) or None


def remember(context, launcher: Launcher, handle: JobHandle) -> None:
    store = context.get("task_state_store")
    state = launcher.state(handle)
    if store is not None and state is not None:
        store.set(_JOB_STATE_KEY, state)


def forget(context, launcher: Launcher) -> None:
    store = context.get("task_state_store")
    if store is not None and _outlives_the_task(launcher):
        store.delete(_JOB_STATE_KEY)
