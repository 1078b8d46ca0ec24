"""What a run in containers ships (Kubernetes pods, Docker containers): the bundle its replicas start
from - the source snapshot, the bootstrap that runs first (``bootstrap.py``), the replica site, each
replica's own files - and the project's training images, which they run by default."""

from __future__ import annotations

import io
import json
import tarfile
import tempfile
from pathlib import Path

from airflow_provider_dnntrain.backends.common import bootstrap, host_cache
from airflow_provider_dnntrain.backends.common.replica import REPLICA_SITE, REPLICA_SITE_MODULES
from airflow_provider_dnntrain.source import snapshot as copy_snapshot
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import JobPlan

# The servers' images by a version's framework: the training images, which have MLflow too.
SERVING_IMAGES = {"pytorch": "dnntrain-torch:cpu", "tensorflow": "dnntrain-tensorflow:cpu"}


def default_image(job: TrainingJob) -> str:
    """The project's training images (``make images``): ``dnntrain-{torch,tensorflow}:{cpu,gpu}``."""
    framework = "torch" if job.framework == "pytorch" else "tensorflow"
    return f"dnntrain-{framework}:{'gpu' if job.resources.use_gpu else 'cpu'}"


def run_bundle(source: Path, plan: JobPlan, resume: str | None = None) -> dict[str, bytes]:
    """The run's files: the source snapshot, the bootstrap, the replica site, and each replica's own
    files (a hostfile)."""
    buffer = io.BytesIO()
    with tempfile.TemporaryDirectory() as scratch:
        snapshot = Path(scratch) / "source"
        copy_snapshot(source, snapshot, resume)
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            tar.add(snapshot, arcname=".")
    files = {r.name: r.files for r in plan.replicas if r.files}
    return {
        "source.tar.gz": buffer.getvalue(),
        "bootstrap.py": Path(bootstrap.__file__).read_bytes(),
        "host_cache.py": Path(host_cache.__file__).read_bytes(),  # the bootstrap's, for inputs
        **{name: (REPLICA_SITE / name).read_bytes() for name in REPLICA_SITE_MODULES},
        "files.json": json.dumps(files).encode(),
    }
