"""One deploy of an endpoint at a time on Kubernetes: a ``coordination.k8s.io`` Lease, as controllers
elect their leader with one."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from datetime import datetime, timezone

from airflow_provider_dnntrain.backends.kubernetes.api import ApiPatience

LEASE_SECONDS = 60


class LeaseLock:
    """A ``coordination.k8s.io`` Lease held while the context lasts, renewed meanwhile; one whose
    holder stopped renewing it (a task killed) is taken over once it has lapsed."""

    def __init__(self, api_client, namespace: str, name: str, patience: ApiPatience) -> None:
        from kubernetes.client import CoordinationV1Api

        self.leases = CoordinationV1Api(api_client)
        self.namespace, self.name, self.api = namespace, name, patience
        self.holder = uuid.uuid4().hex
        self._done = threading.Event()

    def __enter__(self) -> LeaseLock:
        while not self._take():
            time.sleep(1)
        threading.Thread(target=self._renew, daemon=True).start()
        return self

    def _body(self) -> dict:
        now = _micro_time()
        spec = {
            "holderIdentity": self.holder,
            "leaseDurationSeconds": LEASE_SECONDS,
            "acquireTime": now,
            "renewTime": now,
        }
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name},
            "spec": spec,
        }

    def _take(self) -> bool:
        try:
            self.api.call("create lease", self.leases.create_namespaced_lease, self.namespace, self._body())
            return True
        except Exception as error:
            if getattr(error, "status", None) != 409:
                raise
        held = self._held()
        if held is not None and held.spec.holder_identity == self.holder:
            return True  # this create was made, its answer lost
        if held is not None and _lapsed(held):
            self._delete(held)  # its holder stopped renewing it: a task that was killed
        return False

    def _held(self):
        """The Lease as it is now (None: gone meanwhile)."""
        try:
            return self.api.call("read lease", self.leases.read_namespaced_lease, self.name, self.namespace)
        except Exception as error:
            if getattr(error, "status", None) == 404:
                return None
            raise

    def _delete(self, held) -> None:
        """That Lease, unless it changed since it was read (renewed, or taken by another holder)."""
        precondition = {"preconditions": {"resourceVersion": held.metadata.resource_version}}
        # Through the API's patience: a release lost to a server error would hold the next deploy up
        # until the Lease lapses. Gone, or changed since (404, 409): not this one's to delete.
        with contextlib.suppress(Exception):
            self.api.call("delete lease", self.leases.delete_namespaced_lease, self.name, self.namespace,
                          body=precondition)  # fmt: skip

    def _renew(self) -> None:
        while not self._done.wait(LEASE_SECONDS / 4):
            with contextlib.suppress(Exception):
                patch = {"spec": {"renewTime": _micro_time()}}
                self.leases.patch_namespaced_lease(self.name, self.namespace, patch)

    def __exit__(self, *exc) -> None:
        self._done.set()
        with contextlib.suppress(Exception):
            held = self._held()
            if held is not None and held.spec.holder_identity == self.holder:  # not one taken over
                self._delete(held)


def _lapsed(held) -> bool:
    renewed = held.spec.renew_time
    duration = held.spec.lease_duration_seconds or LEASE_SECONDS
    return renewed is None or (datetime.now(timezone.utc) - renewed).total_seconds() > duration


def _micro_time() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
