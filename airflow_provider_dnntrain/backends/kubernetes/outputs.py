"""The chief's ``./outputs`` and ``./logs``, copied out of its pod at the end of a run: the bootstrap in
the pod's outputs sidecar (which keeps the working directory after the replica ends) packs them, and
they come out through ``exec``, as KubernetesPodOperator's XCom sidecar does. A copy that fails - a
cut stream, an API error - is tried again; outputs that never come whole are :class:`OutputsLost`,
never a silent success."""

from __future__ import annotations

import base64
import io
import logging
import tarfile
import time
from pathlib import Path

from airflow_provider_dnntrain.backends.kubernetes.cluster import Cluster
from airflow_provider_dnntrain.backends.kubernetes.manifests import (
    BOOTSTRAP,
    OUTPUTS_CONTAINER,
    outputs_host,
    pod_name,
)
from airflow_provider_dnntrain.backends.kubernetes.run import KubernetesRun

log = logging.getLogger(__name__)
OUTPUTS_ATTEMPTS = 5  # copies that started and failed
_HANDSHAKE_ATTEMPTS = 20  # exec streams the API would not start, about two minutes of them
_BACKOFF_CAP_SECONDS = 8.0
_EXEC_TIMEOUT_SECONDS = 120


class OutputsLost(RuntimeError):
    """The chief's outputs could not be copied out of its pod."""


def copy_outputs(cluster: Cluster, run: KubernetesRun, pod: str, python: str, target: Path) -> None:
    """The outputs and logs the bootstrap packs in ``pod``'s outputs sidecar (with ``python``, as a
    base64 tar.gz), unpacked into ``target``; :class:`OutputsLost` naming the last failure when no
    try gets them whole."""
    if (waiting := _not_running(cluster, run, pod)) is not None:
        raise OutputsLost(f"the outputs container of pod {pod} is not running ({waiting})")
    copies = refused = 0
    while copies < OUTPUTS_ATTEMPTS and refused < _HANDSHAKE_ATTEMPTS:
        try:
            client = _open_exec(cluster, run, pod, [python, BOOTSTRAP, "pack"])
        except Exception as error:  # the API would not start the stream (a fault of its own, often)
            refused, failure = refused + 1, f"the exec was refused: {type(error).__name__}: {error}"
            time.sleep(min(_BACKOFF_CAP_SECONDS, 0.25 * 2**refused))
            continue
        try:
            packed = _read_all(client)
            with tarfile.open(fileobj=io.BytesIO(base64.b64decode(packed)), mode="r:gz") as tar:
                tar.extractall(target, filter="data")
            return
        except Exception as error:  # a cut stream, a bad tar, pack failing
            copies, failure = copies + 1, f"{type(error).__name__}: {error}"
            log.warning("Run %s: copying the outputs out of pod %s failed (%s)", run.run_id, pod, failure)
        if copies < OUTPUTS_ATTEMPTS:
            time.sleep(min(_BACKOFF_CAP_SECONDS, 0.25 * 2**copies))
    raise OutputsLost(f"the outputs of pod {pod} could not be copied ({copies + refused} tries): {failure}")


def _not_running(cluster: Cluster, run: KubernetesRun, pod: str) -> str | None:
    """How the pod's outputs container is, unless it runs (a pod that never started has no outputs)."""
    try:
        found = cluster.call(f"read pod {pod}", cluster.core.read_namespaced_pod, pod, run.namespace)
    except Exception as error:
        return f"the pod cannot be read: {getattr(error, 'status', None) or error}"
    for status in (found.status.container_statuses or []) if found.status else []:
        if status.name == OUTPUTS_CONTAINER:
            if status.state and status.state.running:
                return None
            waiting = status.state.waiting if status.state else None
            return waiting.reason if waiting is not None else "ended"
    return "not started"


def _open_exec(cluster: Cluster, run: KubernetesRun, pod: str, command: list[str]):
    from kubernetes.client import CoreV1Api
    from kubernetes.stream import stream

    # A client of its own: ``stream`` swaps its client's transport for a websocket while it runs.
    core = CoreV1Api(cluster.hook.get_conn())
    return stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        run.namespace,
        container=OUTPUTS_CONTAINER,
        command=command,
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        _preload_content=False,
    )


def _read_all(client) -> str:
    try:
        client.run_forever(timeout=_EXEC_TIMEOUT_SECONDS)
        if client.returncode is None:  # the stream ended before the command said how it ended
            raise ConnectionError("the exec stream ended before the command did")
        if client.returncode != 0:
            raise RuntimeError(f"pack exited {client.returncode}: {client.read_stderr()}")
        return client.read_stdout()
    finally:
        client.close()


def save_outputs(cluster: Cluster, handle) -> None:
    """The chief's ``./outputs`` and ``./logs`` into the run's artifacts; what kept them from being
    copied is kept on ``handle`` (a ``KubernetesJobHandle``) for :func:`collected_outputs`."""
    chief = pod_name(outputs_host(handle.plan))
    try:
        copy_outputs(cluster, handle.run, chief, handle.settings.python, handle.run.run_dir / "artifacts")
    except Exception as error:
        handle.outputs_lost = f"{type(error).__name__}: {error}"


def collected_outputs(handle, required: bool) -> Path:
    """The copied outputs' folder; ``OutputsLost`` when they could not be copied (a warning instead
    when they are not ``required``)."""
    if handle.outputs_lost:
        message = f"run {handle.run_id}: the chief's outputs were not collected: {handle.outputs_lost}"
        if required:
            raise OutputsLost(message)
        log.warning("%s", message)
    artifacts = handle.run.run_dir / "artifacts"
    for sub in ("outputs", "logs"):
        (artifacts / sub).mkdir(parents=True, exist_ok=True)
    return artifacts
