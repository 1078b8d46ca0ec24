"""A run's inputs in its pods (pure): each pod's bootstrap fetches the downloads from URLs the worker
resolved (in the run's Secret: signed URLs and connection headers are credentials) into a cache volume
(a claim every run shares, else the pod's own ``emptyDir``) and links ``inputs/<name>`` to it;
``pvc://<claim>/<path>`` inputs are the claim, mounted read-only."""

from __future__ import annotations

import posixpath
from urllib.parse import urlsplit

from airflow_provider_dnntrain.backends.kubernetes.manifests import WORKDIR
from airflow_provider_dnntrain.spec import Input, TrainingJob

INPUTS_FOLDER = posixpath.join(WORKDIR, "inputs")
# The bootstrap (standard library, shipped alone) names these two as literals.
CACHE_MOUNT = "/dnntrain/inputs-cache"
SOURCES_MOUNT = "/dnntrain/input-sources"
SOURCES_KEY = "inputs.json"  # in the run's Secret
CLAIMS_MOUNT = "/dnntrain/claims"
VOLUME_PREFIX = "dnntrain-"  # the input volumes' names: apart from the user's own volumes


def claim_of(item: Input) -> tuple[str, str]:
    """A ``pvc://`` input's claim and the path inside it."""
    parts = urlsplit(item.uri or "")
    return parts.netloc, parts.path.strip("/")


def claims(job: TrainingJob) -> list[str]:
    return sorted({claim_of(item)[0] for item in job.inputs if item.scheme == "pvc" and not item.downloads})


def place_inputs(job: TrainingJob) -> TrainingJob:
    """The job with each input's path in the pods: downloads under ``inputs/``, claims where mounted."""
    placed = []
    for item in job.with_inputs_in(INPUTS_FOLDER).inputs:
        if item.scheme == "pvc" and not item.downloads:
            claim, inside = claim_of(item)
            item = item.model_copy(update={"path": posixpath.join(CLAIMS_MOUNT, claim, inside).rstrip("/")})
        placed.append(item)
    return job.model_copy(update={"inputs": placed})


def input_volumes(job: TrainingJob, secret: str, cache_claim: str | None) -> tuple[list[dict], list[dict]]:
    """The volumes a pod needs for the job's inputs, and their mounts (in every container that runs the
    bootstrap, so the links it makes resolve wherever the script runs)."""
    volumes, mounts = [], []
    if any(item.downloads for item in job.inputs):
        cache = {"persistentVolumeClaim": {"claimName": cache_claim}} if cache_claim else {"emptyDir": {}}
        items = [{"key": SOURCES_KEY, "path": SOURCES_KEY}]
        volumes += [
            {"name": f"{VOLUME_PREFIX}inputs-cache", **cache},
            {
                "name": f"{VOLUME_PREFIX}input-sources",
                "secret": {"secretName": secret, "defaultMode": 0o400, "items": items},
            },
        ]
        mounts += [
            {"name": f"{VOLUME_PREFIX}inputs-cache", "mountPath": CACHE_MOUNT},
            {"name": f"{VOLUME_PREFIX}input-sources", "mountPath": SOURCES_MOUNT, "readOnly": True},
        ]
    for index, claim in enumerate(claims(job)):
        name = f"{VOLUME_PREFIX}claim-{index}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}})
        mounts.append({"name": name, "mountPath": posixpath.join(CLAIMS_MOUNT, claim), "readOnly": True})
    return volumes, mounts


def check_inputs(job: TrainingJob) -> None:
    """``ValueError`` naming an input the pods could not read."""
    for item in job.inputs:
        if item.downloads and item.scheme == "file":
            raise ValueError(
                f"inputs.{item.name}.uri: {item.uri} is on the Airflow worker's disk, which pods cannot "
                "read: put it in object storage (s3://, gs://, https://...) to download, or on a volume "
                "claim (uri='pvc://<claim>/<path>', mode='mount')"
            )
