"""What keeps a pod Pending on a real cluster for minutes without anything being wrong, switched on per
test through the faults (``faults.Faults``):

- Kueue (``kueue_admit_after``): its webhook gives a pod that names a queue the
  ``kueue.x-k8s.io/admission`` scheduling gate; the pod is ``SchedulingGated`` until Kueue admits its
  group - here once every pod of the group exists and the oldest has waited that long;
- the cluster autoscaler (``scale_up_after``): pods are Unschedulable ("Insufficient cpu") with a
  ``TriggeredScaleUp`` event until the new node is there;
- a registry that throttles (``images_appear_after``): pulls of an image fail with 429 until it has
  been asked for that long (as an image pushed while the job starts).
"""

from __future__ import annotations

import asyncio
import time
import uuid

KUEUE_GATE = "kueue.x-k8s.io/admission"
_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
_GROUP_SIZE = "kueue.x-k8s.io/pod-group-total-count"


class FakeScheduler:
    def __init__(self, cluster, faults) -> None:
        self.cluster = cluster
        self.faults = faults
        self.created: dict[tuple, float] = {}
        self.pulls: dict[str, float] = {}  # image -> when it was first asked for

    def admitted(self, pod: dict) -> dict:
        """Kueue's webhook, on a pod being created."""
        labels = pod["metadata"].get("labels") or {}
        if self.faults.kueue_admit_after and _QUEUE_LABEL in labels:
            pod["spec"].setdefault("schedulingGates", []).append({"name": KUEUE_GATE})
        return pod

    async def wait_to_schedule(self, key: tuple) -> None:
        """Until nothing holds the pod back: its gates, a scale-up."""
        created = self.created.setdefault(key, time.monotonic())
        said_scale_up = False
        while (pod := self.cluster.store.objects.get(key)) is not None:
            if pod["spec"].get("schedulingGates"):
                message = "Scheduling is blocked due to non-empty scheduling gates"
                self._unscheduled(key, "SchedulingGated", message)
                self._admit_group_when_due(pod)
            elif time.monotonic() - created < self.faults.scale_up_after:
                self._unscheduled(key, "Unschedulable", "0/1 nodes are available: 1 Insufficient cpu.")
                if not said_scale_up:
                    said_scale_up = True
                    self._event(pod, "TriggeredScaleUp", "pod triggered scale-up: [{pool-a 1->2 (max: 4)}]")
            else:
                return
            await asyncio.sleep(0.25)

    def pull_fails(self, image: str) -> str | None:
        """The registry's answer while an image is not there yet (``None``: it pulls)."""
        wait = (self.faults.images_appear_after or {}).get(image)
        if not wait:
            return None
        first = self.pulls.setdefault(image, time.monotonic())
        if time.monotonic() - first >= wait:
            return None
        throttled = "unexpected status from HEAD request: 429 Too Many Requests"
        return f'failed to pull and unpack image "{image}": {throttled}'

    def _unscheduled(self, key: tuple, reason: str, message: str) -> None:
        condition = {"type": "PodScheduled", "status": "False", "reason": reason, "message": message}
        pod = self.cluster.store.objects.get(key)
        if pod is not None and (pod.get("status") or {}).get("conditions") != [condition]:
            self.cluster.set_status(key, phase="Pending", conditions=[condition])

    def _admit_group_when_due(self, pod: dict) -> None:
        labels, namespace = pod["metadata"].get("labels") or {}, pod["metadata"]["namespace"]
        group = labels.get(_GROUP_LABEL)
        members = [
            (key, obj)
            for key, obj in self.cluster.store.objects.items()
            if key[2] == "pods"
            and key[1] == namespace
            and (obj["metadata"].get("labels") or {}).get(_GROUP_LABEL) == group
        ]
        size = int((pod["metadata"].get("annotations") or {}).get(_GROUP_SIZE, "1"))
        oldest = min(self.created.get(key, time.monotonic()) for key, _ in members)
        if len(members) < size or time.monotonic() - oldest < self.faults.kueue_admit_after:
            return
        for key, obj in members:
            obj["spec"]["schedulingGates"] = [
                g for g in obj["spec"].get("schedulingGates", []) if g["name"] != KUEUE_GATE
            ]
            self.cluster.store.put(key, obj, "MODIFIED")

    def _event(self, pod: dict, reason: str, message: str) -> None:
        meta = pod["metadata"]
        name = f"{meta['name']}.{uuid.uuid4().hex[:12]}"
        key = ("api/v1", meta["namespace"], "events", name)
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"], "uid": str(uuid.uuid4())},
            "involvedObject": {"kind": "Pod", "name": meta["name"], "namespace": meta["namespace"]},
            "reason": reason,
            "message": message,
            "type": "Normal",
            "source": {"component": "cluster-autoscaler"},
        }
        self.cluster.store.put(key, event, "ADDED")
