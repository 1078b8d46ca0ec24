"""Driving a launcher the way the training operator does, for every backend's launcher tests: a job run
to its end, or waited on in the background while the test acts on it."""

from __future__ import annotations

import threading
import time


def run_job(launcher, job, run_id: str, timeout: float = 240):
    """Submit ``job`` through ``launcher`` and wait for it; the handle and every line logged (printed,
    for a failing test's output)."""
    from airflow_provider_dnntrain.backends.base import wait_for_job

    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    lines = []
    try:
        wait_for_job(launcher, handle, lines.append, timeout=timeout)
    finally:
        print("\n".join(map(str, lines)))
    return handle, lines


def wait_in_background(launcher, handle):
    """wait_for_job in a thread; its lines and its outcome (the status, or the exception)."""
    from airflow_provider_dnntrain.backends.base import wait_for_job

    lines, outcome = [], {}

    def wait() -> None:
        try:
            outcome["status"] = wait_for_job(launcher, handle, lines.append, timeout=120)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread, lines, outcome


def wait_until_ready(lines: list, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while sum(" ready" in line.text for line in list(lines)) < count:
        assert time.monotonic() < deadline, f"replicas not ready: {[str(line) for line in lines]}"
        time.sleep(0.1)


def rank_lines(lines: list, rank: int) -> str:
    """A rank's lines, whichever way the runner labels them (per-rank files or horovodrun's prefix)."""
    by_file = [line.text for line in lines if line.replica == f"launcher-0/rank.{rank}"]
    by_prefix = [line.text.split(":", 1)[1] for line in lines if line.text.startswith(f"[{rank}]<stdout>:")]
    return "\n".join(by_file + by_prefix)
