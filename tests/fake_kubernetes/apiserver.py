"""A fake Kubernetes cluster in one process: an API server over real HTTP and a kubelet that runs pods.

The API server stores objects (core v1 and custom resources), validates core objects with
kubernetes-validate (strict) as admission, answers lists with label selectors and watches, deletes
with garbage collection by owner reference, serves ``pods/log`` (follow, timestamps, sinceSeconds,
tailLines) and ``pods/exec`` over a websocket (the v4 channel protocol). It counts requests.

The kubelet "schedules" a pod on its one node (node selectors and extended resources are honoured:
a pod asking for what the node lacks stays Pending, Unschedulable), "pulls" its images (only the
images it was told exist: others end in ErrImagePull / ImagePullBackOff), gives the pod a network
namespace with an address on a bridge (in a namespace of its own), publishes ``<hostname>.<subdomain>``
names for pods behind a headless Service in every pod's /etc/hosts, prepares its volumes (configMap,
secret, emptyDir, hostPath, persistentVolumeClaim) and runs each container's command as real processes
(the project's venv standing in for the image), with the environment resolved from Secrets as
Kubernetes does, ``$(VAR)`` expansion included. Deleting a pod sends SIGTERM to every process in it,
then SIGKILL after its grace period. ``POST /fake/evict/<ns>/<pod>`` evicts a pod as node pressure does.

Run: python apiserver.py --root DIR --port-file FILE --prefix NAME --images a,b --gateway-port P
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import kubernetes_validate
from aiohttp import web

CONTAINER_SHIM = Path(__file__).with_name("container.py")
VENV_BIN = Path(sys.executable).parent
CLONE_NEWNET = 0x40000000
KUBERNETES_VERSION = "1.37.0"
NODE_LABELS = {"kubernetes.io/hostname": "fake-node", "kubernetes.io/os": "linux"}
NODE_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
KINDS = {
    "pods": "Pod",
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "services": "Service",
    "events": "Event",
}
TOKEN = "fake-cluster-token"


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_timestamp() -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, as kubelet writes them."""
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    whole = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def status_error(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update({"message": message, "reason": reason, "code": code})
    return web.json_response(body, status=code)


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is a literal ``$``, unknown references stay as written."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            following = text[i + 1]
            if following == "$":
                out.append("$")
                i += 2
                continue
            if following == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Store:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        self.version = 0
        self.watchers: list[tuple[tuple[str, str, str], str, asyncio.Queue]] = []

    def bump(self, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    def emit(self, kind: str, key: tuple, obj: dict) -> None:
        for scope, selector, queue in self.watchers:
            if scope == key[:3] and matches(obj["metadata"].get("labels") or {}, selector):
                queue.put_nowait({"type": kind, "object": json.loads(json.dumps(obj))})

    def put(self, key: tuple, obj: dict, event: str) -> None:
        self.bump(obj)
        self.objects[key] = obj
        self.emit(event, key, obj)

    def remove(self, key: tuple) -> dict | None:
        obj = self.objects.pop(key, None)
        if obj is not None:
            self.bump(obj)
            self.emit("DELETED", key, obj)
        return obj

    def listed(self, scope: tuple, selector: str) -> list[dict]:
        return [
            obj
            for key, obj in self.objects.items()
            if key[:3] == scope and matches(obj["metadata"].get("labels") or {}, selector)
        ]


class Container:
    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self.done = asyncio.Event()


class PodRuntime:
    def __init__(self, key: tuple, number: int, directory: Path) -> None:
        self.key = key
        self.number = number
        self.directory = directory
        self.netns: str | None = None
        self.ip: str | None = None
        self.containers: dict[str, Container] = {}
        self.mounts: dict[str, list[tuple[str, str]]] = {}
        self.env: dict[str, dict[str, str]] = {}
        self.hostname = ""
        self.task: asyncio.Task | None = None
        self.terminating = False
        self.evicted = False


class Cluster:
    def __init__(self, root: Path, prefix: str, images: list[str], gateway_port: int | None) -> None:
        self.root = root
        self.prefix = prefix
        self.images = images
        self.gateway_port = gateway_port
        self.store = Store()
        self.runtimes: dict[tuple, PodRuntime] = {}
        self.pod_numbers = iter(range(2, 60000))
        self.requests: collections.Counter = collections.Counter()
        self.bridge = f"{prefix}-br"

    # -- network -------------------------------------------------------------------------------

    async def ip(self, *args: str, check: bool = True) -> None:
        process = await asyncio.create_subprocess_exec(
            "ip", *args, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
        )
        _, err = await process.communicate()
        if check and process.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {err.decode().strip()}")

    async def start_network(self) -> None:
        await self.ip("netns", "add", self.bridge)
        await self.ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
        await self.ip("-n", self.bridge, "addr", "add", "10.215.0.1/16", "dev", "br0")
        await self.ip("-n", self.bridge, "link", "set", "br0", "up")
        await self.ip("-n", self.bridge, "link", "set", "lo", "up")
        if self.gateway_port:
            await self.start_gateway(self.gateway_port)

    async def start_gateway(self, port: int) -> None:
        """10.215.0.1:<port> on the pods' network reaches 127.0.0.1:<port> here: how pods reach a
        worker that shares the cluster's network."""
        listener = await asyncio.to_thread(_listen_in_namespace, self.bridge, ("10.215.0.1", port))

        async def relay(reader, writer) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        await asyncio.start_server(relay, sock=listener)

    async def pod_network(self, runtime: PodRuntime) -> None:
        n = runtime.number
        runtime.netns = f"{self.prefix}-p{n}"
        runtime.ip = f"10.215.{n // 250}.{n % 250 + 2}"
        peer = f"v{n}"
        await self.ip("netns", "add", runtime.netns)
        await self.ip("link", "add", "eth0", "netns", runtime.netns, "type", "veth", "peer", "name", peer,
                      "netns", self.bridge)  # fmt: skip
        await self.ip("-n", self.bridge, "link", "set", peer, "master", "br0", "up")
        await self.ip("-n", runtime.netns, "addr", "add", f"{runtime.ip}/16", "dev", "eth0")
        await self.ip("-n", runtime.netns, "link", "set", "eth0", "up")
        await self.ip("-n", runtime.netns, "link", "set", "lo", "up")
        etc = Path("/etc/netns") / runtime.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        self.publish_names(runtime.key[1])

    def publish_names(self, namespace: str) -> None:
        """Every pod's /etc/hosts: the names of the pods that headless Services select, as cluster
        DNS would answer them (written in place: ``ip netns exec`` bind-mounts the file)."""
        services = {
            obj["metadata"]["name"]: obj
            for key, obj in self.store.objects.items()
            if key[1:3] == (namespace, "services") and obj["spec"].get("clusterIP") == "None"
        }
        lines = ["127.0.0.1 localhost"]
        for runtime in self.runtimes.values():
            pod = self.store.objects.get(runtime.key)
            if runtime.key[1] != namespace or pod is None or runtime.ip is None:
                continue
            hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
            names = [hostname]
            service = services.get(pod["spec"].get("subdomain", ""))
            selector = (service or {}).get("spec", {}).get("selector") or {}
            labels = pod["metadata"].get("labels") or {}
            if service and selector and all(labels.get(k) == v for k, v in selector.items()):
                sub = pod["spec"]["subdomain"]
                names = [f"{hostname}.{sub}.{namespace}.svc.cluster.local", f"{hostname}.{sub}", hostname]
            lines.append(f"{runtime.ip} {' '.join(names)}")
        text = "\n".join(lines) + "\n"
        for runtime in self.runtimes.values():
            if runtime.key[1] == namespace and runtime.netns:
                path = Path("/etc/netns") / runtime.netns / "hosts"
                with contextlib.suppress(OSError), open(path, "r+") as handle:
                    handle.seek(0)
                    handle.write(text)
                    handle.truncate()

    # -- the kubelet ------------------------------------------------------------------------------

    def set_status(self, key: tuple, **changes) -> None:
        pod = self.store.objects.get(key)
        if pod is None:
            return
        pod.setdefault("status", {}).update(changes)
        self.store.put(key, pod, "MODIFIED")

    def container_statuses(self, pod: dict, state_of) -> list[dict]:
        statuses = []
        for container in pod["spec"]["containers"]:
            state = state_of(container["name"])
            statuses.append(
                {
                    "name": container["name"],
                    "image": container.get("image", ""),
                    "imageID": "",
                    "ready": "running" in state,
                    "restartCount": 0,
                    "started": "running" in state,
                    "state": state,
                }
            )
        return statuses

    async def run_pod(self, key: tuple) -> None:
        pod = self.store.objects[key]
        runtime = self.runtimes[key]
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        unschedulable = self.unschedulable(pod)
        if unschedulable:
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
            self.set_status(key, phase="Pending", conditions=[{**condition, "message": unschedulable}])
            return
        scheduled = [{"type": "PodScheduled", "status": "True"}]
        self.set_status(
            key, phase="Pending", conditions=scheduled, hostIP="10.215.0.1", startTime=now_rfc3339()
        )
        self.set_status(key, containerStatuses=self.container_statuses(pod, lambda _: waiting))
        missing = [c for c in pod["spec"]["containers"] if not self.image_exists(c.get("image", ""))]
        if missing:
            await self.fail_pull(key, pod, missing)
            return
        await self.pod_network(runtime)
        try:
            self.prepare(pod, runtime)
        except LookupError as error:
            failing = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            self.set_status(key, containerStatuses=self.container_statuses(pod, lambda _: failing))
            return
        started = now_rfc3339()
        for container in pod["spec"]["containers"]:
            await self.start_container(runtime, pod, container)
        running = {"running": {"startedAt": started}}
        self.set_status(
            key,
            phase="Running",
            podIP=runtime.ip,
            podIPs=[{"ip": runtime.ip}],
            conditions=[*scheduled, {"type": "Ready", "status": "True"}],
            containerStatuses=self.container_statuses(pod, lambda _: running),
        )
        await asyncio.gather(
            *(self.watch_container(runtime, c, started) for c in runtime.containers.values())
        )

    def unschedulable(self, pod: dict) -> str | None:
        selector = pod["spec"].get("nodeSelector") or {}
        if any(NODE_LABELS.get(k) != v for k, v in selector.items()):
            return "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector."
        for container in pod["spec"]["containers"]:
            resources = container.get("resources") or {}
            for name in {**resources.get("limits", {}), **resources.get("requests", {})}:
                if name not in NODE_RESOURCES:
                    return f"0/1 nodes are available: 1 Insufficient {name}."
        return None

    def image_exists(self, image: str) -> bool:
        return any(image == known or image.startswith(f"{known}:") for known in self.images)

    async def fail_pull(self, key: tuple, pod: dict, missing: list[dict]) -> None:
        names = {c["name"] for c in missing}
        for reason in ("ErrImagePull", "ImagePullBackOff"):
            message = (
                f'Back-off pulling image "{missing[0]["image"]}": ErrImagePull: failed to resolve reference'
            )
            if reason == "ErrImagePull":
                message = f'failed to pull and unpack image "{missing[0]["image"]}": not found'

            def state(name: str, reason=reason, message=message) -> dict:
                if name in names:
                    return {"waiting": {"reason": reason, "message": message}}
                return {"waiting": {"reason": "ContainerCreating"}}

            self.set_status(key, containerStatuses=self.container_statuses(pod, state))
            await asyncio.sleep(1)

    def prepare(self, pod: dict, runtime: PodRuntime) -> None:
        """Volumes into the pod's folder, and each container's mounts and environment."""
        namespace = runtime.key[1]
        volumes = {}
        for volume in pod["spec"].get("volumes") or []:
            volumes[volume["name"]] = self.volume(namespace, runtime, volume)
        runtime.hostname = pod["spec"].get("hostname") or pod["metadata"]["name"]
        for container in pod["spec"]["containers"]:
            mounts = []
            for mount in container.get("volumeMounts") or []:
                source = volumes[mount["name"]]
                if mount.get("subPath"):
                    source = str(Path(source) / mount["subPath"])
                mounts.append((source, mount["mountPath"]))
            runtime.mounts[container["name"]] = mounts
            runtime.env[container["name"]] = self.environment(namespace, runtime, container)

    def volume(self, namespace: str, runtime: PodRuntime, volume: dict) -> str:
        folder = runtime.directory / "volumes" / volume["name"]
        folder.mkdir(parents=True, exist_ok=True)
        if "emptyDir" in volume:
            return str(folder)
        if "hostPath" in volume:
            Path(volume["hostPath"]["path"]).mkdir(parents=True, exist_ok=True)
            return volume["hostPath"]["path"]
        if "persistentVolumeClaim" in volume:
            claim = self.root / "volumes" / namespace / volume["persistentVolumeClaim"]["claimName"]
            claim.mkdir(parents=True, exist_ok=True)
            return str(claim)
        for kind, field, plural in (("configMap", "name", "configmaps"), ("secret", "secretName", "secrets")):
            if kind in volume:
                source = volume[kind]
                obj = self.store.objects.get(("api/v1", namespace, plural, source[field]))
                if obj is None:
                    if source.get("optional"):
                        return str(folder)
                    raise LookupError(f'{plural[:-1]} "{source[field]}" not found')
                files = {k: v.encode() for k, v in (obj.get("data") or {}).items()}
                binary = obj.get("binaryData") or {}
                if kind == "secret":
                    files = {k: base64.b64decode(v) for k, v in (obj.get("data") or {}).items()}
                files.update({k: base64.b64decode(v) for k, v in binary.items()})
                items = source.get("items")
                chosen = {i["path"]: files[i["key"]] for i in items} if items else files
                mode = source.get("defaultMode", 0o644)
                for path, data in chosen.items():
                    target = folder / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                    target.chmod(mode)
                return str(folder)
        raise LookupError(f"volume {volume['name']}: this fake kubelet cannot provide it")

    def environment(self, namespace: str, runtime: PodRuntime, container: dict) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": runtime.hostname,
        }
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.store.objects.get(("api/v1", namespace, "secrets", ref["name"]))
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    if ref.get("optional"):
                        continue
                    raise LookupError(f'secret "{ref["name"]}" or its key "{ref["key"]}" not found')
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def container_spec(self, runtime: PodRuntime, container: dict, argv: list[str]) -> Path:
        env = runtime.env[container["name"]]
        spec = {
            "hostname": runtime.hostname,
            "mounts": runtime.mounts[container["name"]],
            "workdir": container.get("workingDir") or "/",
            "env": env,
            "argv": [expand(a, env) for a in argv],
        }
        path = runtime.directory / f"{container['name']}-{uuid.uuid4().hex[:8]}.json"
        path.write_text(json.dumps(spec))
        return path

    def in_pod(self, runtime: PodRuntime, spec: Path) -> list[str]:
        return [
            "ip", "netns", "exec", runtime.netns, "unshare", "--uts", "--mount", "--propagation", "private",
            sys.executable, str(CONTAINER_SHIM), str(spec),
        ]  # fmt: skip

    async def start_container(self, runtime: PodRuntime, pod: dict, container: dict) -> None:
        argv = [*container.get("command", []), *container.get("args", [])]
        spec = self.container_spec(runtime, container, argv)
        state = Container(container["name"], runtime.directory / f"{container['name']}.log")
        state.log_path.touch()
        state.process = await asyncio.create_subprocess_exec(
            *self.in_pod(runtime, spec),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        runtime.containers[container["name"]] = state

    async def watch_container(self, runtime: PodRuntime, container: Container, started: str) -> None:
        with open(container.log_path, "ab", buffering=0) as log:
            partial = b""
            while chunk := await container.process.stdout.read(65536):
                partial += chunk
                *lines, partial = partial.split(b"\n")
                if lines:
                    log.write(b"".join(f"{log_timestamp()} ".encode() + line + b"\n" for line in lines))
            if partial:
                log.write(f"{log_timestamp()} ".encode() + partial + b"\n")
        code = await container.process.wait()
        container.exit_code = 128 - code if code < 0 else code  # killed by signal N: 128 + N
        container.done.set()
        self.container_ended(runtime, container, started)

    def container_ended(self, runtime: PodRuntime, container: Container, started: str) -> None:
        pod = self.store.objects.get(runtime.key)
        if pod is None:
            return
        statuses = pod["status"].get("containerStatuses") or []
        for status in statuses:
            if status["name"] == container.name:
                reason = "Completed" if container.exit_code == 0 else "Error"
                status["state"] = {
                    "terminated": {
                        "exitCode": container.exit_code,
                        "reason": reason,
                        "startedAt": started,
                        "finishedAt": now_rfc3339(),
                    }
                }
                status["ready"] = status["started"] = False
        codes = [c.exit_code for c in runtime.containers.values()]
        phase = pod["status"].get("phase")
        if all(code is not None for code in codes) and phase == "Running":
            phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        self.set_status(runtime.key, containerStatuses=statuses, phase=phase)

    async def terminate(self, key: tuple, grace: float, evict: bool = False) -> None:
        """SIGTERM every process of the pod, SIGKILL after ``grace``; then the pod is gone (or, when
        evicted, Failed and kept)."""
        runtime = self.runtimes.get(key)
        if runtime is None:
            self.store.remove(key)
            return
        if runtime.terminating:
            if runtime.evicted and not evict:  # its processes are gone already: the object goes now
                await self.forget(key)
            return
        runtime.terminating = True
        runtime.evicted = evict
        if runtime.task is not None and not runtime.containers:
            runtime.task.cancel()
        if runtime.netns:
            await self.kill_all(runtime, grace)
        if evict:
            message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 20Mi."
            self.set_status(key, phase="Failed", reason="Evicted", message=message)
            return
        await self.forget(key)

    async def kill_all(self, runtime: PodRuntime, grace: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
            for pid in namespace_pids(runtime.netns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while namespace_pids(runtime.netns) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        for container in runtime.containers.values():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(container.done.wait(), 10)

    async def forget(self, key: tuple) -> None:
        runtime = self.runtimes.pop(key, None)
        self.store.remove(key)
        if runtime is not None and runtime.netns:
            await self.ip("netns", "del", runtime.netns, check=False)
            with contextlib.suppress(OSError):
                for leftover in (Path("/etc/netns") / runtime.netns).iterdir():
                    leftover.unlink()
                (Path("/etc/netns") / runtime.netns).rmdir()
        self.publish_names(key[1])

    # -- API ---------------------------------------------------------------------------------------

    def create(self, scope: tuple, obj: dict) -> web.Response:
        prefix, namespace, plural = scope
        meta = obj.setdefault("metadata", {})
        name = meta.get("name")
        if not name:
            return status_error(422, "Invalid", f"{plural}: metadata.name: Required value")
        if prefix == "api/v1":
            try:
                kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                message = str(error).splitlines()[0]
                return status_error(
                    422, "Invalid", f'{KINDS.get(plural, plural)} "{name}" is invalid: {message}'
                )
        key = (prefix, namespace, plural, name)
        if key in self.store.objects:
            return status_error(409, "AlreadyExists", f'{plural} "{name}" already exists')
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        if plural == "pods":
            obj["status"] = {"phase": "Pending"}
        self.store.put(key, obj, "ADDED")
        if plural == "pods":
            number = next(self.pod_numbers)
            runtime = PodRuntime(key, number, self.root / "pods" / f"{namespace}-{name}-{number}")
            runtime.directory.mkdir(parents=True)
            self.runtimes[key] = runtime
            runtime.task = asyncio.create_task(self.run_pod(key))
        if plural == "services":
            self.publish_names(namespace)
        return web.json_response(obj, status=201)

    async def delete(self, key: tuple, grace: float | None = None) -> dict | None:
        obj = self.store.objects.get(key)
        if obj is None:
            return None
        if key[2] == "pods":
            if grace is None:
                grace = obj["spec"].get("terminationGracePeriodSeconds", 30)
            obj["metadata"]["deletionTimestamp"] = now_rfc3339()
            obj["metadata"]["deletionGracePeriodSeconds"] = int(grace)
            self.store.put(key, obj, "MODIFIED")
            asyncio.create_task(self.terminate(key, grace))
        else:
            self.store.remove(key)
        await self.collect_garbage(obj["metadata"]["uid"])
        return obj

    async def collect_garbage(self, owner_uid: str) -> None:
        dependents = [
            key
            for key, obj in list(self.store.objects.items())
            if any(ref.get("uid") == owner_uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]
        for key in dependents:
            await self.delete(key)


def _listen_in_namespace(namespace: str, address: tuple[str, int]) -> socket.socket:
    """A listening socket in another network namespace (made by a thread that joined it; the socket
    stays there whoever uses it)."""
    with open(f"/run/netns/{namespace}") as handle:
        if ctypes.CDLL(None, use_errno=True).setns(handle.fileno(), CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns")
    listener = socket.create_server(address)
    listener.setblocking(False)
    return listener


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def namespace_pids(namespace: str) -> list[int]:
    """Every process whose network namespace is ``namespace`` (what ``ip netns pids`` reports)."""
    try:
        target = os.stat(f"/run/netns/{namespace}").st_ino
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    found.append(int(entry))
    return found


# -- HTTP -------------------------------------------------------------------------------------------


def scope_of(request: web.Request) -> tuple[str, str, str]:
    info = request.match_info
    prefix = f"apis/{info['group']}/{info['version']}" if "group" in info else "api/v1"
    return prefix, info["namespace"], info["plural"]


def list_kind(scope: tuple, items: list[dict]) -> str:
    kind = KINDS.get(scope[2]) or (items[0]["kind"] if items else "Object")
    return f"{kind}List"


def routes(cluster: Cluster) -> web.Application:
    @web.middleware
    async def authenticate(request: web.Request, handler):
        if request.path.startswith("/fake/"):
            return await handler(request)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return status_error(401, "Unauthorized", "Unauthorized")
        what = request.match_info.get("plural", "pods")
        sub = request.match_info.get("sub", "")
        watching = (request.query.get("watch") or "").lower() in ("true", "1")
        cluster.requests[
            f"{request.method} {what}{'/' + sub if sub else ''}{' watch' if watching else ''}"
        ] += 1
        return await handler(request)

    async def collection(request: web.Request) -> web.StreamResponse:
        scope = scope_of(request)
        selector = request.query.get("labelSelector", "")
        if request.method == "POST":
            return cluster.create(scope, await request.json())
        if request.method == "DELETE":
            grace = request.query.get("gracePeriodSeconds")
            body = await _body(request)
            grace = body.get("gracePeriodSeconds", grace)
            doomed = cluster.store.listed(scope, selector)
            for obj in doomed:
                key = (*scope, obj["metadata"]["name"])
                await cluster.delete(key, None if grace is None else float(grace))
            return web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Success", "metadata": {}}
            )
        if (request.query.get("watch") or "").lower() in ("true", "1"):
            return await watch(request, scope, selector)
        items = cluster.store.listed(scope, selector)
        meta = {"resourceVersion": str(cluster.store.version)}
        body = {"kind": list_kind(scope, items), "apiVersion": "v1", "metadata": meta, "items": items}
        return web.json_response(body)

    async def watch(request: web.Request, scope: tuple, selector: str) -> web.StreamResponse:
        queue: asyncio.Queue = asyncio.Queue()
        since = int(request.query.get("resourceVersion") or 0)
        watcher = (scope, selector, queue)
        cluster.store.watchers.append(watcher)
        response = web.StreamResponse()
        response.content_type = "application/json"
        await response.prepare(request)
        if not since:
            for obj in cluster.store.listed(scope, selector):
                queue.put_nowait({"type": "ADDED", "object": obj})
        timeout = float(request.query.get("timeoutSeconds") or 3600)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    event = await asyncio.wait_for(queue.get(), max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    break
                if int(event["object"]["metadata"]["resourceVersion"]) <= since:
                    continue
                await response.write(json.dumps(event).encode() + b"\n")
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            cluster.store.watchers.remove(watcher)
        return response

    async def item(request: web.Request) -> web.StreamResponse:
        scope = scope_of(request)
        key = (*scope, request.match_info["name"])
        if request.method == "GET":
            obj = cluster.store.objects.get(key)
            if obj is None:
                return status_error(404, "NotFound", f'{scope[2]} "{key[3]}" not found')
            return web.json_response(obj)
        if request.method == "DELETE":
            body = await _body(request)
            grace = body.get("gracePeriodSeconds", request.query.get("gracePeriodSeconds"))
            obj = await cluster.delete(key, None if grace is None else float(grace))
            if obj is None:
                return status_error(404, "NotFound", f'{scope[2]} "{key[3]}" not found')
            return web.json_response(obj)
        if request.method == "PATCH":  # merge patch (a strategic one is the same for these objects)
            obj = cluster.store.objects.get(key)
            if obj is None:
                return status_error(404, "NotFound", f'{scope[2]} "{key[3]}" not found')
            _merge(obj, await request.json())
            cluster.store.put(key, obj, "MODIFIED")
            return web.json_response(obj)
        return status_error(405, "MethodNotAllowed", request.method)

    async def pod_log(request: web.Request) -> web.StreamResponse:
        key = ("api/v1", request.match_info["namespace"], "pods", request.match_info["name"])
        runtime = cluster.runtimes.get(key)
        pod = cluster.store.objects.get(key)
        if pod is None:
            return status_error(404, "NotFound", f'pods "{key[3]}" not found')
        names = [c["name"] for c in pod["spec"]["containers"]]
        name = request.query.get("container") or (names[0] if len(names) == 1 else None)
        if name is None:
            message = f"a container name must be specified for pod {key[3]}, choose one of: {names}"
            return status_error(400, "BadRequest", message)
        container = runtime.containers.get(name) if runtime else None
        if container is None:
            message = f'container "{name}" in pod "{key[3]}" is waiting to start: ContainerCreating'
            return status_error(400, "BadRequest", message)
        follow = (request.query.get("follow") or "").lower() in ("true", "1")
        stamps = (request.query.get("timestamps") or "").lower() in ("true", "1")
        since = request.query.get("sinceSeconds")
        earliest = time.time() - float(since) if since else None
        tail = request.query.get("tailLines")
        response = web.StreamResponse()
        response.content_type = "text/plain"
        await response.prepare(request)

        def shown(lines: list[bytes]) -> bytes:
            kept = []
            for line in lines:
                stamp, _, text = line.partition(b" ")
                if earliest is not None and _epoch(stamp.decode()) < earliest:
                    continue
                kept.append(line if stamps else text)
            return b"".join(k + b"\n" for k in kept)

        with open(container.log_path, "rb") as log:
            lines = log.read().split(b"\n")
            partial = lines.pop()
            if tail is not None:
                lines = lines[-int(tail) :] if int(tail) else []
            await response.write(shown(lines))
            while follow:
                ended = container.done.is_set()
                chunk = log.read()
                if chunk:
                    partial += chunk
                    *lines, partial = partial.split(b"\n")
                    with contextlib.suppress(ConnectionResetError):
                        await response.write(shown(lines))
                elif ended or key not in cluster.runtimes:
                    break
                else:
                    await asyncio.sleep(0.05)
        return response

    async def pod_exec(request: web.Request) -> web.StreamResponse:
        key = ("api/v1", request.match_info["namespace"], "pods", request.match_info["name"])
        runtime = cluster.runtimes.get(key)
        name = request.query.get("container")
        container = runtime.containers.get(name) if runtime and name else None
        if container is None or container.done.is_set():
            return status_error(400, "BadRequest", f'container "{name}" is not running in pod "{key[3]}"')
        socket_ = web.WebSocketResponse(protocols=("v4.channel.k8s.io",))
        await socket_.prepare(request)
        pod = cluster.store.objects[key]
        spec_container = next(c for c in pod["spec"]["containers"] if c["name"] == name)
        spec = cluster.container_spec(runtime, spec_container, request.query.getall("command"))
        process = await asyncio.create_subprocess_exec(
            *cluster.in_pod(runtime, spec),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        async def relay(stream, channel: int) -> None:
            while data := await stream.read(65536):
                await socket_.send_bytes(bytes([channel]) + data)

        await asyncio.gather(relay(process.stdout, 1), relay(process.stderr, 2))
        code = await process.wait()
        if code == 0:
            result = {"metadata": {}, "status": "Success"}
        else:
            causes = [{"reason": "ExitCode", "message": str(code)}]
            result = {
                "metadata": {},
                "status": "Failure",
                "reason": "NonZeroExitCode",
                "details": {"causes": causes},
            }
        await socket_.send_bytes(b"\x03" + json.dumps(result).encode())
        await socket_.close()
        return socket_

    async def evict(request: web.Request) -> web.Response:
        key = ("api/v1", request.match_info["namespace"], "pods", request.match_info["name"])
        await cluster.terminate(key, grace=0, evict=True)
        return web.json_response({"evicted": key[3]})

    async def requests_made(request: web.Request) -> web.Response:
        return web.json_response(dict(cluster.requests))

    app = web.Application(middlewares=[authenticate], client_max_size=8 * 1024 * 1024)
    core = "/api/v1/namespaces/{namespace}/{plural}"
    custom = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
    for base in (core, custom):
        app.router.add_route("*", base, collection)
        app.router.add_route("*", base + "/{name}", item)
    app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}/{sub:log}", pod_log)
    app.router.add_route("*", "/api/v1/namespaces/{namespace}/pods/{name}/{sub:exec}", pod_exec)
    app.router.add_post("/fake/evict/{namespace}/{name}", evict)
    app.router.add_get("/fake/requests", requests_made)
    return app


def _merge(target: dict, patch: dict) -> None:
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = value


async def _body(request: web.Request) -> dict:
    if not request.can_read_body:
        return {}
    with contextlib.suppress(ValueError):
        return await request.json() or {}
    return {}


def _epoch(stamp: str) -> float:
    whole, _, fraction = stamp.rstrip("Z").partition(".")
    moment = datetime.strptime(whole, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)
    return moment.timestamp() + float(f"0.{fraction or 0}")


async def serve(args: argparse.Namespace) -> None:
    cluster = Cluster(Path(args.root), args.prefix, args.images.split(","), args.gateway_port)
    await cluster.start_network()
    runner = web.AppRunner(routes(cluster), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    Path(args.port_file).write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for key in list(cluster.runtimes):
        await cluster.terminate(key, grace=0)
    await cluster.ip("netns", "del", cluster.bridge, check=False)
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--gateway-port", type=int, default=0)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
