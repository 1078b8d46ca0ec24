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
A namespace's LimitRanges default and bound its pods' resources at admission; a container's memory
limit is enforced by a memory cgroup (OOMKilled, exit 137), ``GET /fake/memory`` tells the most memory
each limited container of a removed pod used; ``activeDeadlineSeconds`` ends a pod (DeadlineExceeded).

With ``--training-operator run``, the cluster serves TFJobs and PyTorchJobs (``kubeflow.org/v1``) and runs
them as Kubeflow's training operator does (``fake_training_operator.py``); with ``crd`` it serves them
but no operator runs them; without it, it serves none.

Run: python apiserver.py --root DIR --port-file FILE --prefix NAME --images a,b --gateway-port P
     [--training-operator run|crd]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

from aiohttp import web
from fake_kubelet import KINDS, Cluster, status_error  # beside this script, on its path
from fake_scheduler import FakeScheduler
from fake_serving import connect_in_namespace
from fake_store import TOKEN
from faults import Faults, Rbac, middleware, owner_references_allowed
from faults import routes as fault_routes

# -- HTTP -------------------------------------------------------------------------------------------


def scope_of(request: web.Request) -> tuple[str, str, str]:
    info = request.match_info
    prefix = f"apis/{info['group']}/{info['version']}" if "group" in info else "api/v1"
    return prefix, info["namespace"], info["plural"]


def list_kind(scope: tuple, items: list[dict]) -> str:
    kind = KINDS.get(scope[2]) or (items[0]["kind"] if items else "Object")
    return f"{kind}List"


def routes(cluster: Cluster, faults: Faults, rbac: Rbac) -> web.Application:
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
            return await owner_references_allowed(request, rbac) or cluster.create(
                scope, await request.json()
            )
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
        items = [o for o in cluster.store.listed(scope, selector) if _fields_match(o, request.query)]
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
            old_spec = json.loads(json.dumps(obj.get("spec")))
            _merge(obj, await request.json())
            cluster.store.put(key, obj, "MODIFIED")
            cluster.spec_changed(key, old_spec)
            return web.json_response(obj)
        if request.method == "PUT":
            return cluster.replace(key, await request.json())
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
        cut_at = time.monotonic() + faults.cut_logs_after if faults.cut_logs_after else None

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
                if cut_at is not None and time.monotonic() > cut_at:
                    faults.injected["log stream cut"] += 1
                    first = (partial + chunk).split(b"\n")[0]
                    await _cut(request, response, shown([first]) if first else b"")
                    return response
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
            *cluster.in_pod(runtime, spec, name),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )

        cut = faults.cut_exec()

        async def relay(stream, channel: int) -> None:
            while data := await stream.read(65536):
                if cut and channel == 1:  # half of it, and the connection is gone
                    await socket_.send_bytes(bytes([channel]) + data[: len(data) // 2])
                    request.transport.close()
                    return
                await socket_.send_bytes(bytes([channel]) + data)

        await asyncio.gather(relay(process.stdout, 1), relay(process.stderr, 2))
        if cut:
            process.kill()
            await process.wait()
            return socket_
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

    async def pod_port_forward(request: web.Request) -> web.StreamResponse:
        """One connection to the pod's port per websocket: channel 0 its data, 1 its errors, each
        opened with a frame naming the port (little-endian), as the API server's v4 protocol does."""
        key = ("api/v1", request.match_info["namespace"], "pods", request.match_info["name"])
        runtime = cluster.runtimes.get(key)
        port = int(request.query.get("ports", "0").split(",")[0])
        if runtime is None or runtime.ip is None:
            return status_error(400, "BadRequest", f'pod "{key[3]}" is not running')
        socket_ = web.WebSocketResponse(protocols=("v4.channel.k8s.io", "v5.channel.k8s.io"))
        await socket_.prepare(request)
        opening = port.to_bytes(2, "little")
        await socket_.send_bytes(b"\x00" + opening)
        await socket_.send_bytes(b"\x01" + opening)
        try:
            sock = await asyncio.to_thread(connect_in_namespace, cluster.bridge, (runtime.ip, port))
            reader, writer = await asyncio.open_connection(sock=sock)
        except OSError as error:
            await socket_.send_bytes(b"\x01" + f"connection refused: {error}".encode())
            await socket_.close()
            return socket_

        async def from_pod() -> None:
            while data := await reader.read(65536):
                await socket_.send_bytes(b"\x00" + data)
            await socket_.close()

        async def to_pod() -> None:
            async for message in socket_:
                if message.type == web.WSMsgType.BINARY and message.data[:1] == b"\x00":
                    writer.write(message.data[1:])
                    await writer.drain()
            writer.close()

        await asyncio.gather(from_pod(), to_pod(), return_exceptions=True)
        return socket_

    async def evict(request: web.Request) -> web.Response:
        key = ("api/v1", request.match_info["namespace"], "pods", request.match_info["name"])
        message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 20Mi."
        await cluster.terminate(key, grace=0, failed=("Evicted", message))
        return web.json_response({"evicted": key[3]})

    async def requests_made(request: web.Request) -> web.Response:
        return web.json_response(dict(cluster.requests))

    async def memory_peaks(request: web.Request) -> web.Response:
        return web.json_response(cluster.memory_peaks)

    app = web.Application(
        middlewares=[authenticate, middleware(faults, rbac)], client_max_size=8 * 1024 * 1024
    )
    fault_routes(app, faults, rbac)
    core = "/api/v1/namespaces/{namespace}/{plural}"
    custom = "/apis/{group}/{version}/namespaces/{namespace}/{plural}"
    for base in (core, custom):
        app.router.add_route("*", base, collection)
        app.router.add_route("*", base + "/{name}", item)
    app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}/{sub:log}", pod_log)
    app.router.add_route("*", "/api/v1/namespaces/{namespace}/pods/{name}/{sub:exec}", pod_exec)
    app.router.add_get("/api/v1/namespaces/{namespace}/pods/{name}/{sub:portforward}", pod_port_forward)
    app.router.add_post("/fake/evict/{namespace}/{name}", evict)
    app.router.add_get("/fake/requests", requests_made)
    app.router.add_get("/fake/memory", memory_peaks)
    return app


async def _cut(request: web.Request, response: web.StreamResponse, line: bytes) -> None:
    """Cut the stream as a dropped connection does: in the middle of a line, with no end."""
    if line:
        await response.write(line[: max(1, len(line) // 2)])
    request.transport.close()


def _fields_match(obj: dict, query) -> bool:
    """A ``fieldSelector`` of ``path.to.field=value`` terms."""
    for term in filter(None, (query.get("fieldSelector") or "").split(",")):
        path, _, wanted = term.partition("=")
        value = obj
        for part in path.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if str(value) != wanted:
            return False
    return True


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
    cluster = Cluster(
        Path(args.root), args.prefix, args.images.split(","), args.gateway_port, args.training_operator
    )
    await cluster.start_network()
    faults = Faults()
    cluster.scheduler = FakeScheduler(cluster, faults)
    runner = web.AppRunner(routes(cluster, faults, Rbac()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    cluster.api_port = port
    await cluster.start_gateway(port)  # pods reach the API too (their service account's client)
    Path(args.port_file).write_text(str(port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    for key in list(cluster.runtimes):
        await cluster.terminate(key, grace=0)
    await cluster.ip("netns", "del", cluster.bridge, check=False)
    cluster.memory.remove_all()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", required=True)
    parser.add_argument("--port-file", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--images", default="")
    parser.add_argument("--gateway-port", type=int, default=0)
    parser.add_argument("--training-operator", choices=("run", "crd"), default=None)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
