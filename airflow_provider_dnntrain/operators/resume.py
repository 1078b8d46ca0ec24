"""The earlier run's outputs a training run continues from: ``resume_from`` (a folder on the worker, or
a training run id whose outputs the tracking store has) or, on a retry, the previous try's."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_dnntrain.operators.job_fields import InvalidTrainingJob
from airflow_provider_dnntrain.run_id import run_id_of_try
from airflow_provider_dnntrain.spec import TrainingJob


def with_resume(operator, job: TrainingJob, ti, session, scratch: Path) -> TrainingJob:
    """``job`` with the outputs to continue from (downloaded into ``scratch`` when they are a run's),
    or as it is when there are none; ``InvalidTrainingJob`` naming ``resume_from`` when it names
    nothing that exists."""
    wanted, automatic = operator.resume_from, False
    if not wanted and ti.try_number > 1 and operator.resume_on_retry:
        wanted, automatic = run_id_of_try(ti, ti.try_number - 1), True
    if not wanted:
        return job
    folder = Path(wanted.removeprefix("file://")).expanduser()
    try:
        if automatic or not folder.is_dir():
            if session is None:
                raise LookupError("tracking is off, so no run's outputs can be looked up")
            folder = session.download_outputs(wanted, scratch)
    except LookupError as error:
        if automatic:
            operator.log.info("Try %d starts afresh: %s", ti.try_number, error)
            return job
        raise InvalidTrainingJob(
            f"task {operator.task_id!r}: invalid training job: resume_from: {wanted!r} is not a folder here "
            f"nor a training run with outputs ({error})"
        ) from None
    operator.log.info("Resuming from %s (%s)", wanted, folder)
    return job.model_copy(update={"resume_from": str(folder), "resume_argument": operator.resume_argument})
