"""A training run's model registered as a version that loads and serves: packaged by
:mod:`.packaging` into the run's ``registered/<model_path>``, and tagged with what it needs to serve."""

from __future__ import annotations

import contextlib
import math
import posixpath
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.models import packaging

_UNKNOWN = ("", "unknown")


@dataclass
class Packaging:
    """How a run's saved model becomes a pyfunc model (see ``RegisterModelOperator``)."""

    model_format: str = "auto"
    input_example: Any = None
    model_class: str | None = None
    framework_version: str | None = None

    def __call__(self, client, run, outputs_path: str, registered_path: str) -> dict[str, str]:
        with tempfile.TemporaryDirectory(prefix="dnntrain-register-") as work:
            folder = _downloaded(client, run.info.run_id, outputs_path, Path(work))
            model = packaging.find_model(folder, self.model_format)
            trained_with = run.data.tags.get("dnntrain.framework_version", "")
            pinned = self.framework_version or (None if trained_with in _UNKNOWN else trained_with)
            into = Path(work) / "pyfunc"
            requirements = packaging.package(
                folder,
                into,
                model,
                input_example=self.input_example,
                model_class=self.model_class,
                framework_version=pinned,
            )
            client.log_artifacts(run.info.run_id, str(into), registered_path)
        return {"model_format": model.format, "requirements": " ".join(requirements)}


def _downloaded(client, mlflow_run_id: str, outputs_path: str, work: Path) -> Path:
    """``outputs/<model_path>`` in a folder here: a folder as it is; a file (``model_path`` naming the
    model itself) in a folder of its own, with the input example beside it if there is one."""
    downloaded = Path(client.download_artifacts(mlflow_run_id, outputs_path, str(work)))
    if downloaded.is_dir():
        return downloaded
    folder = work / "file"
    folder.mkdir()
    downloaded.replace(folder / downloaded.name)
    beside = f"{posixpath.dirname(outputs_path)}/{packaging.EXAMPLE_FILE}"
    with contextlib.suppress(Exception):  # no example beside it: one may be given, or none is found
        client.download_artifacts(mlflow_run_id, beside, str(folder))
    return folder


def register(
    tracking_uri: str,
    run_id: str,
    model_name: str,
    model_path: str,
    tags: dict[str, str],
    packing: Packaging | None,
) -> dict[str, Any]:
    """Register the run's model (``packing`` None: its files as they are); return the version as the
    task hands it on: name, version, run ids, source, metrics and the version's tags."""
    version = tracking.register_model(tracking_uri, run_id, model_name, model_path, tags, packing)
    client = tracking.client(tracking_uri)
    registered = client.get_model_version(model_name, str(version))
    run = client.get_run(registered.run_id)
    return {
        "name": model_name,
        "version": version,
        "model_uri": f"models:/{model_name}/{version}",
        "run_id": run.data.tags.get(tracking.RUN_ID_TAG, run_id),
        "tracking_run_id": registered.run_id,
        "source": registered.source,
        "metrics": {key: value for key, value in run.data.metrics.items() if math.isfinite(value)},
        "tags": dict(registered.tags),
    }
