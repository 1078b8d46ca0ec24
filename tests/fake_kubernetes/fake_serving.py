"""What the fake cluster does for served models, as Kubernetes does it:

- a **Deployment controller**: a Deployment's pods made from its template (named
  ``<deployment>-<template hash>-<suffix>``, owned by it, so deleting it deletes them), pods of an
  older template replaced, the count kept at ``spec.replicas``, and its status (``replicas``,
  ``readyReplicas``, ``updatedReplicas``, ``availableReplicas``, ``observedGeneration``) following its
  pods' readiness. (No ReplicaSets in between; a failed pod is not restarted, as a container in
  CrashLoopBackOff never comes up.)
- **readiness probes**: a container with an ``httpGet`` readiness probe is ready only while its server
  answers 200 from the pod network (probed every second, whatever ``periodSeconds`` says);
- **ClusterIP Services**: an address on the pods' network per Service, where each connection is relayed
  to one of the ready pods its selector chooses at that moment (round robin), as kube-proxy does; the
  Service's name resolves to it in every pod's /etc/hosts;
- **port-forward** (``pods/portforward``): a connection into a pod's port from the API server, which
  ``kubernetes.stream.portforward`` carries over a websocket.

Mixed into the cluster (``fake_kubelet.Cluster``): uses its ``store``, ``runtimes``, ``bridge`` and
``create``/``delete``.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import itertools
import json
import random
import socket
import string

from fake_network import CLONE_NEWNET, _listen_in_namespace, _pipe

APPS = "apis/apps/v1"
PROBE_SECONDS = 1.0
_cluster_ips = itertools.count(2)


def connect_in_namespace(namespace: str, address: tuple[str, int], timeout: float = 5) -> socket.socket:
    """A TCP connection made from another network namespace (by a thread that joined it)."""
    with open(f"/run/netns/{namespace}") as handle:
        if ctypes.CDLL(None, use_errno=True).setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    connection = socket.create_connection(address, timeout=timeout)
    connection.settimeout(None)
    return connection


def count_generation(obj: dict, old_spec: dict | None) -> None:
    """``metadata.generation``: 1 when made, one more at each change of its spec."""
    meta = obj["metadata"]
    if old_spec is None:
        meta["generation"] = 1
    elif old_spec != obj["spec"]:
        meta["generation"] = meta.get("generation", 1) + 1


def template_hash(template: dict) -> str:
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()[:10]


class ServingControllers:
    services_running: dict  # (namespace, name) -> (address, [servers])

    # -- Deployments --------------------------------------------------------------------------------

    def deployment_changed(self, key: tuple, old_spec: dict | None) -> None:
        deployment = self.store.objects.get(key)
        if deployment is None:
            return
        count_generation(deployment, old_spec)
        self.reconcile_deployment(key)

    def owned_pods(self, deployment: dict) -> list[tuple[tuple, dict]]:
        uid = deployment["metadata"]["uid"]
        return [
            (key, pod)
            for key, pod in self.store.objects.items()
            if key[2] == "pods"
            and any(r.get("uid") == uid for r in pod["metadata"].get("ownerReferences") or [])
        ]

    def reconcile_deployment(self, key: tuple) -> None:
        deployment = self.store.objects[key]
        template = deployment["spec"]["template"]
        wanted_hash = template_hash(template)
        alive = []
        for pod_key, pod in self.owned_pods(deployment):
            if pod["metadata"].get("deletionTimestamp"):
                continue
            if pod["metadata"]["labels"].get("pod-template-hash") != wanted_hash:
                asyncio.ensure_future(self.delete(pod_key))
            else:
                alive.append(pod_key)
        replicas = deployment["spec"].get("replicas", 1)
        for pod_key in alive[replicas:]:
            asyncio.ensure_future(self.delete(pod_key))
        for _ in range(replicas - len(alive)):
            self.create(("api/v1", key[1], "pods"), self.pod_of(deployment, wanted_hash))
        self.update_deployment_status(key)

    def pod_of(self, deployment: dict, pod_hash: str) -> dict:
        template = json.loads(json.dumps(deployment["spec"]["template"]))
        suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
        meta = template.get("metadata") or {}
        meta["name"] = f"{deployment['metadata']['name']}-{pod_hash}-{suffix}"
        meta["labels"] = {**(meta.get("labels") or {}), "pod-template-hash": pod_hash}
        owner = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        meta["ownerReferences"] = [{**owner, "uid": deployment["metadata"]["uid"], "controller": True}]
        template["metadata"] = meta
        template["spec"].setdefault("restartPolicy", "Always")
        return {"apiVersion": "v1", "kind": "Pod", **template}

    def update_deployment_status(self, key: tuple) -> None:
        deployment = self.store.objects.get(key)
        if deployment is None:
            return
        wanted_hash = template_hash(deployment["spec"]["template"])
        pods = [p for _, p in self.owned_pods(deployment) if not p["metadata"].get("deletionTimestamp")]
        updated = [p for p in pods if p["metadata"]["labels"].get("pod-template-hash") == wanted_hash]
        ready = [p for p in updated if _ready(p)]
        status = {
            "observedGeneration": deployment["metadata"].get("generation", 1),
            "replicas": len(pods),
            "updatedReplicas": len(updated),
            "readyReplicas": len(ready),
            "availableReplicas": len(ready),
        }
        if deployment.get("status") != status:
            deployment["status"] = status
            self.store.put(key, deployment, "MODIFIED")

    def pod_status_changed(self, pod: dict) -> None:
        for ref in pod["metadata"].get("ownerReferences") or []:
            if ref.get("kind") == "Deployment":
                self.update_deployment_status(
                    (APPS, pod["metadata"]["namespace"], "deployments", ref["name"])
                )

    # -- readiness --------------------------------------------------------------------------------------

    def readiness_probes(self, pod: dict) -> dict[str, dict]:
        return {
            c["name"]: c["readinessProbe"]["httpGet"]
            for c in pod["spec"]["containers"]
            if "httpGet" in (c.get("readinessProbe") or {})
        }

    async def probe_readiness(self, key: tuple, runtime, probes: dict[str, dict]) -> None:
        """Each probed container's readiness, and the pod's, kept current while the pod lives."""
        was = None
        while self.runtimes.get(key) is runtime and not runtime.terminating:
            ready = {}
            for name, get in probes.items():
                alive = name in runtime.containers and not runtime.containers[name].done.is_set()
                ready[name] = alive and await self.answers(runtime, get)
            if ready != was:
                self.set_readiness(key, ready)
                was = ready
            await asyncio.sleep(PROBE_SECONDS)

    async def answers(self, runtime, get: dict) -> bool:
        try:
            sock = await asyncio.to_thread(
                connect_in_namespace, self.bridge, (runtime.ip, int(get["port"])), 2
            )
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(f"GET {get.get('path', '/')} HTTP/1.0\r\nHost: {runtime.ip}\r\n\r\n".encode())
            status_line = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            return status_line.split()[1:2] == [b"200"]
        except (OSError, asyncio.TimeoutError, IndexError):
            return False

    def set_readiness(self, key: tuple, ready: dict[str, bool]) -> None:
        pod = self.store.objects.get(key)
        if pod is None:
            return
        statuses = pod["status"].get("containerStatuses") or []
        for status in statuses:
            if status["name"] in ready:
                status["ready"] = ready[status["name"]]
        all_ready = all(s.get("ready") for s in statuses)
        conditions = [c for c in pod["status"].get("conditions") or [] if c["type"] != "Ready"]
        conditions.append({"type": "Ready", "status": "True" if all_ready else "False"})
        self.set_status(key, containerStatuses=statuses, conditions=conditions)

    # -- Services -----------------------------------------------------------------------------------------

    async def service_created(self, key: tuple) -> None:
        service = self.store.objects[key]
        spec = service["spec"]
        if spec.get("clusterIP") == "None" or spec.get("type", "ClusterIP") == "ExternalName":
            return
        address = f"10.215.254.{next(_cluster_ips)}"
        spec["clusterIP"], spec["clusterIPs"] = address, [address]
        self.store.put(key, service, "MODIFIED")
        await self.ip("-n", self.bridge, "addr", "add", f"{address}/32", "dev", "br0")
        servers = []
        for port in spec.get("ports") or []:
            listener = await asyncio.to_thread(_listen_in_namespace, self.bridge, (address, port["port"]))
            relay = self.service_relay(key, port)
            servers.append(await asyncio.start_server(relay, sock=listener))
        self.services_running[key] = (address, servers)
        self.publish_names(key[1])

    def service_relay(self, key: tuple, port: dict):
        turn = itertools.count()

        async def relay(reader, writer) -> None:
            service = self.store.objects.get(key)
            selector = (service or {}).get("spec", {}).get("selector") or {}
            chosen = [
                runtime
                for pod_key, runtime in self.runtimes.items()
                if pod_key[1] == key[1]
                and runtime.ip
                and _ready(self.store.objects.get(pod_key) or {})
                and all(
                    (self.store.objects[pod_key]["metadata"].get("labels") or {}).get(k) == v
                    for k, v in selector.items()
                )
            ]
            chosen = self.routed(key, chosen)
            if not chosen:
                writer.close()  # no endpoints: refused, as kube-proxy's REJECT
                return
            runtime = chosen[next(turn) % len(chosen)]
            target = (runtime.ip, int(port.get("targetPort", port["port"])))
            try:
                sock = await asyncio.to_thread(connect_in_namespace, self.bridge, target)
                up_reader, up_writer = await asyncio.open_connection(sock=sock)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        return relay

    def routed(self, service_key: tuple, chosen: list) -> list:
        """The pods a connection may go to, of those the selector chose (all, for a plain Service)."""
        return chosen

    async def service_deleted(self, key: tuple) -> None:
        address, servers = self.services_running.pop(key, (None, []))
        for server in servers:
            server.close()
        if address:
            await self.ip("-n", self.bridge, "addr", "del", f"{address}/32", "dev", "br0", check=False)
        self.publish_names(key[1])

    def cluster_ip_names(self, namespace: str) -> list[str]:
        """``<address> <names>`` lines for every ClusterIP Service of ``namespace``."""
        lines = []
        for (ns, name), (address, _) in [((k[1], k[3]), v) for k, v in self.services_running.items()]:
            if ns == namespace:
                lines.append(f"{address} {name}.{ns}.svc.cluster.local {name}.{ns}.svc {name}")
        return lines


def _ready(pod: dict) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )
