"""The chief's ``./outputs`` and ``./logs``, copied out of its pod at the end of a run: the bootstrap in
the pod's outputs sidecar (which keeps the working directory after the replica ends) sends them as a
tar stream through ``exec``, as KubernetesPodOperator's XCom sidecar does, ended by a manifest of every
file's size and SHA-256. Both sides hold a block at a time, whatever the outputs weigh; the copy lands
in a staging folder and is moved in place only once the manifest checks out. A copy that fails - a cut
stream, an API error, a file that differs - is tried again; outputs that never come whole are
:class:`OutputsLost`, never a silent success."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
import tempfile
import time
from pathlib import Path, PurePosixPath

from airflow_provider_dnntrain.backends.base import OutputsLost
from airflow_provider_dnntrain.backends.common.bootstrap import MANIFEST, sha256_of
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
_IDLE_TIMEOUT_SECONDS = 60.0  # a copy that sends nothing for this long is stuck: it is tried again
_STDOUT, _STDERR, _ERROR = 1, 2, 3  # the exec's channels


def copy_outputs(cluster: Cluster, run: KubernetesRun, pod: str, python: str, target: Path) -> None:
    """The outputs and logs the bootstrap packs in ``pod``'s outputs sidecar (with ``python``) into
    ``target``, checked against their manifest; :class:`OutputsLost` naming the last failure when no
    try gets them whole."""
    copies = refused = 0
    while copies < OUTPUTS_ATTEMPTS and refused < _HANDSHAKE_ATTEMPTS:
        if (waiting := _not_running(cluster, run, pod)) is not None:
            raise OutputsLost(f"the outputs container of pod {pod} is not running ({waiting})")
        try:
            client = _open_exec(cluster, run, pod, [python, BOOTSTRAP, "pack"])
        except Exception as error:  # the API would not start the stream (a fault of its own, often)
            refused, failure = refused + 1, f"the exec was refused: {type(error).__name__}: {error}"
            time.sleep(min(_BACKOFF_CAP_SECONDS, 0.25 * 2**refused))
            continue
        try:
            _receive(client, target)
            return
        except Exception as error:  # a cut stream, a bad tar, a file that differs, pack failing
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
    client = stream(
        core.connect_get_namespaced_pod_exec,
        pod,
        run.namespace,
        container=OUTPUTS_CONTAINER,
        command=command,
        stderr=True,
        stdin=False,
        stdout=True,
        tty=False,
        binary=True,
        _preload_content=False,
    )
    client._all = _Discarded()  # else it keeps a copy of everything sent (``stream`` cannot say not to)
    return client


class _Discarded:
    def write(self, data) -> None:
        pass

    def getvalue(self) -> bytes:
        return b""


def _receive(client, target: Path) -> None:
    """The tar stream into a staging folder beside ``target``, checked, then moved into ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".outputs-", dir=target.parent))
    stdout = _ExecStdout(client)
    try:
        with tarfile.open(fileobj=io.BufferedReader(stdout, 1 << 16), mode="r|") as tar:
            tar.extractall(staging, filter="data")
        stdout.finish()
        _check_manifest(staging)
        for made in staging.iterdir():
            shutil.rmtree(target / made.name, ignore_errors=True)
            made.replace(target / made.name)
    finally:
        client.close()
        shutil.rmtree(staging, ignore_errors=True)


class _ExecStdout(io.RawIOBase):
    """The exec's stdout as a file read as it arrives: only the frame at hand is held."""

    def __init__(self, client) -> None:
        self.client = client
        self.frame, self.offset = b"", 0
        self.stderr = b""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset >= len(self.frame):
            if not self._next_frame():
                return 0
        size = min(len(buffer), len(self.frame) - self.offset)
        buffer[:size] = self.frame[self.offset : self.offset + size]
        self.offset += size
        return size

    def _next_frame(self) -> bool:
        """The next piece of stdout (``False`` once the stream has ended); ``TimeoutError`` when
        nothing comes for ``_IDLE_TIMEOUT_SECONDS``."""
        since = time.monotonic()
        while self.client.is_open():
            self.client.update(timeout=1)
            self.stderr = (self.stderr + self.client.read_channel(_STDERR))[-4096:]
            if chunk := self.client.read_channel(_STDOUT):
                self.frame, self.offset = chunk, 0
                return True
            if time.monotonic() - since > _IDLE_TIMEOUT_SECONDS:
                raise TimeoutError(f"the copy sent nothing for {_IDLE_TIMEOUT_SECONDS:.0f} s")
        return False

    def finish(self) -> None:
        """What is left of the stream (a tar's padding) read, and how ``pack`` ended checked."""
        while self._next_frame():
            pass
        if not self.client.peek_channel(_ERROR):
            raise ConnectionError("the exec stream ended before the command did")
        if self.client.returncode != 0:
            stderr = self.stderr.decode(errors="replace").strip()
            raise RuntimeError(f"pack exited {self.client.returncode}: {stderr}")


def _check_manifest(staging: Path) -> None:
    manifest_file = staging / MANIFEST
    if not manifest_file.is_file():
        raise ConnectionError("the copy ended before its manifest")
    manifest = json.loads(manifest_file.read_text())
    manifest_file.unlink()
    for name, (size, digest) in manifest.items():
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts:
            raise ValueError(f"the manifest names a file outside the outputs: {name}")
        copied = staging / relative
        if not copied.is_file() or copied.stat().st_size != size or sha256_of(str(copied)) != digest:
            raise ValueError(f"{name} differs from the manifest (size {size}, SHA-256 {digest[:12]}...)")


def save_outputs(cluster: Cluster, handle) -> None:
    """The chief's ``./outputs`` and ``./logs`` into the run's artifacts; what kept them from being
    copied is kept on ``handle`` (a ``KubernetesJobHandle``) for ``collect_outputs``."""
    chief = pod_name(outputs_host(handle.plan))
    try:
        copy_outputs(cluster, handle.run, chief, handle.settings.python, handle.run.run_dir / "artifacts")
    except Exception as error:
        handle.outputs_lost = f"{type(error).__name__}: {error}"
