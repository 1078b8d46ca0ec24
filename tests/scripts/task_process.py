"""A stand-in Airflow task process (tests only): submits a job and waits for it, as the operator does,
until the test kills it. Usage: task_process.py WORK_ROOT RUN_ID JOB_JSON [KUBERNETES_OPTIONS_JSON]
(the local launcher, or with the last argument the Kubernetes launcher with those options)."""

from __future__ import annotations

import json
import sys

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.launchers import KubernetesLauncher, LocalLauncher
from airflow_provider_dnntrain.spec import TrainingJob


def main() -> None:
    work_root, run_id, job_json = sys.argv[1:4]
    job = TrainingJob.model_validate_json(job_json)
    if len(sys.argv) > 4:
        launcher = KubernetesLauncher(work_root=work_root, **json.loads(sys.argv[4]))
    else:
        launcher = LocalLauncher(work_root=work_root, stop_grace_seconds=3)
    handle = launcher.submit(job, launcher.plan(job, run_id), extra_env={})
    launch_id = handle.run.launch_id if hasattr(handle, "run") else handle.launch_id
    print(f"launch {launch_id}", flush=True)
    wait_for_job(launcher, handle, lambda line: None)


if __name__ == "__main__":
    main()
