"""The fake cluster's kubelet and object lifecycle: pods scheduled on one node, images "pulled", volumes
prepared, containers run as real processes inside their pod's network namespace (the project's venv
standing in for the image), statuses reported, graceful deletion, eviction, and garbage collection by
owner reference. Memory limits and LimitRanges are enforced as a node and the API server enforce them
(``fake_limits.py``), and ``activeDeadlineSeconds`` as kubelet does."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from pathlib import Path

import kubernetes_validate
from aiohttp import web
from fake_kserve import ENTRYPOINTS as KSERVE_ENTRYPOINTS
from fake_kserve import KSERVE, KServeController, admit_inference_service
from fake_limits import MemoryCgroups, admit
from fake_network import GATEWAY, PodNetwork, namespace_pids
from fake_registry import in_local_registry, pull_credentials, pull_refusal
from fake_serving import APPS
from fake_store import TOKEN, Store, expand, log_timestamp, now_rfc3339
from fake_training_operator import GROUP as KUBEFLOW_GROUP
from fake_training_operator import KINDS as KUBEFLOW_KINDS
from fake_training_operator import TrainingOperator
from fake_volumes import keep_config_maps_current

CONTAINER_SHIM = Path(__file__).with_name("container.py")
FAKE_KUBECTL = Path(__file__).with_name("fake_kubectl.py")
VENV_BIN = Path(sys.executable).parent
# Images whose own entrypoint runs when a container gives no command (other images need one here).
ENTRYPOINTS = {
    "kubeflow/kubectl-delivery": [sys.executable, str(FAKE_KUBECTL), "deliver"],
    **KSERVE_ENTRYPOINTS,
}
SERVICE_ACCOUNT_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
KUBERNETES_VERSION = "1.37.0"
NODE_LABELS = {"kubernetes.io/hostname": "fake-node", "kubernetes.io/os": "linux"}
NODE_RESOURCES = {"cpu", "memory", "ephemeral-storage"}
KINDS = {
    "pods": "Pod",
    "configmaps": "ConfigMap",
    "secrets": "Secret",
    "services": "Service",
    "serviceaccounts": "ServiceAccount",
    "events": "Event",
}


def status_error(code: int, reason: str, message: str) -> web.Response:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update({"message": message, "reason": reason, "code": code})
    return web.json_response(body, status=code)


class Container:
    def __init__(self, name: str, log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None  # why it ended, when not by its own exit (OOMKilled)
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
        self.cgroups: dict[str, Path] = {}  # container -> its memory cgroup, when it has a limit
        self.hostname = ""
        self.task: asyncio.Task | None = None
        self.volume_sync: asyncio.Task | None = None
        self.deadline: asyncio.Task | None = None  # ends the pod at its activeDeadlineSeconds
        self.readiness: asyncio.Task | None = None  # probes its containers' readiness
        self.terminating = False
        self.evicted = False


class Cluster(PodNetwork, TrainingOperator, KServeController):
    def __init__(
        self,
        root: Path,
        prefix: str,
        images: list[str],
        gateway_port: int | None,
        training_operator: str | None = None,
    ) -> None:
        self.root = root
        self.training_operator = training_operator
        self.prefix = prefix
        self.images = images
        self.gateway_port = gateway_port
        self.api_port = 0  # this API server's, which pods reach at the gateway's address
        self.store = Store()
        self.runtimes: dict[tuple, PodRuntime] = {}
        self.pod_numbers = iter(range(2, 60000))
        self.requests: collections.Counter = collections.Counter()
        self.bridge = f"{prefix}-br"
        self.memory = MemoryCgroups(f"{prefix}-{os.getpid()}")
        self.memory_peaks: dict[str, int] = {}  # "namespace/pod/container" -> most bytes it used
        self.services_running: dict = {}
        self.turns: dict = {}

    # -- the kubelet ------------------------------------------------------------------------------

    def set_status(self, key: tuple, **changes) -> None:
        pod = self.store.objects.get(key)
        if pod is None:
            return
        pod.setdefault("status", {}).update(changes)
        self.store.put(key, pod, "MODIFIED")
        self.pod_status_changed(pod)

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
        await self.scheduler.wait_to_schedule(key)
        pod = self.store.objects[key]
        runtime = self.runtimes[key]
        waiting = {"waiting": {"reason": "ContainerCreating"}}
        unschedulable = self.unschedulable(pod)
        if unschedulable:
            condition = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
            self.set_status(key, phase="Pending", conditions=[{**condition, "message": unschedulable}])
            return
        scheduled = [{"type": "PodScheduled", "status": "True"}]
        scheduled_at = time.monotonic()  # the pod's startTime, from which its active deadline counts
        self.set_status(key, phase="Pending", conditions=scheduled, hostIP=GATEWAY, startTime=now_rfc3339())
        self.set_status(key, containerStatuses=self.container_statuses(pod, lambda _: waiting))
        await self.pull_throttled(key, pod)
        refusals = self.pull_refusals(key[1], pod)  # here: the executor's threads may be in pods' netns
        if refusals:
            await self.fail_pull(key, pod, refusals)
            return
        await self.pod_network(runtime)
        try:
            self.prepare(pod, runtime)
        except LookupError as error:
            failing = {"waiting": {"reason": "CreateContainerConfigError", "message": str(error)}}
            self.set_status(key, containerStatuses=self.container_statuses(pod, lambda _: failing))
            return
        if not await self.run_init_containers(runtime, pod):
            return
        started = now_rfc3339()
        for container in pod["spec"]["containers"]:
            await self.start_container(runtime, pod, container)
        runtime.volume_sync = asyncio.create_task(keep_config_maps_current(self, runtime, pod))
        if (deadline := pod["spec"].get("activeDeadlineSeconds")) is not None:
            left = deadline - (time.monotonic() - scheduled_at)
            runtime.deadline = asyncio.create_task(self.end_at_deadline(key, runtime, left))
        running = {"running": {"startedAt": started}}
        probes = self.readiness_probes(pod)
        self.set_status(
            key,
            phase="Running",
            podIP=runtime.ip,
            podIPs=[{"ip": runtime.ip}],
            conditions=[*scheduled, {"type": "Ready", "status": "False" if probes else "True"}],
            containerStatuses=self.container_statuses(pod, lambda _: running),
        )
        if probes:  # ready once its servers answer
            self.set_readiness(key, {name: False for name in probes})
            runtime.readiness = asyncio.create_task(self.probe_readiness(key, runtime, probes))
        await asyncio.gather(
            *(self.watch_container(runtime, c, started) for c in runtime.containers.values())
        )

    async def end_at_deadline(self, key: tuple, runtime: PodRuntime, seconds: float) -> None:
        await asyncio.sleep(max(0.0, seconds))
        if self.runtimes.get(key) is runtime and not runtime.terminating:
            message = "Pod was active on the node longer than the specified deadline"
            await self.terminate(key, grace=0, failed=("DeadlineExceeded", message))

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
        known = [*self.images, *ENTRYPOINTS]
        return any(image == name or image.startswith(f"{name}:") for name in known)

    def entrypoint(self, image: str) -> list[str]:
        return next((argv for name, argv in ENTRYPOINTS.items() if image.split(":")[0] == name), [])

    async def pull_throttled(self, key: tuple, pod: dict) -> None:
        """Kubelet retrying pulls the registry throttles, until they succeed."""
        for container in pod["spec"]["containers"]:
            image = container.get("image", "")
            while (refusal := self.scheduler.pull_fails(image)) is not None and key in self.store.objects:
                for reason in ("ErrImagePull", "ImagePullBackOff"):
                    failing = {"waiting": {"reason": reason, "message": refusal}}
                    statuses = self.container_statuses(pod, lambda _, failing=failing: failing)
                    self.set_status(key, containerStatuses=statuses)
                    await asyncio.sleep(0.5)

    def pull_refusals(self, namespace: str, pod: dict) -> dict[str, tuple[str, str]]:
        """``{container: (image, why it cannot be pulled)}``: a local registry's images are asked for
        there, with the pod's pull secrets; others must be in the images the cluster was given."""
        refs = [ref["name"] for ref in pod["spec"].get("imagePullSecrets") or []]
        secrets = [self.store.objects.get(("api/v1", namespace, "secrets", name)) or {} for name in refs]
        credentials = pull_credentials(secrets)
        refusals = {}
        for container in pod["spec"]["containers"]:
            image = container.get("image", "")
            if in_local_registry(image):
                refusal = pull_refusal(image, credentials)
            else:
                refusal = (
                    None
                    if self.image_exists(image)
                    else f'failed to pull and unpack image "{image}": not found'
                )
            if refusal:
                refusals[container["name"]] = (image, refusal)
        return refusals

    async def fail_pull(self, key: tuple, pod: dict, refusals: dict[str, tuple[str, str]]) -> None:
        image, refusal = next(iter(refusals.values()))
        for reason in ("ErrImagePull", "ImagePullBackOff"):
            message = (
                refusal
                if reason == "ErrImagePull"
                else f'Back-off pulling image "{image}": ErrImagePull: {refusal}'
            )

            def state(name: str, reason=reason, message=message) -> dict:
                if name in refusals:
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
        account = self.service_account_folder(namespace, runtime, pod)
        for container in [*(pod["spec"].get("initContainers") or []), *pod["spec"]["containers"]]:
            mounts = [(account, SERVICE_ACCOUNT_MOUNT)] if account else []
            for mount in container.get("volumeMounts") or []:
                source = volumes[mount["name"]]
                if mount.get("subPath"):
                    source = str(Path(source) / mount["subPath"])
                mounts.append((source, mount["mountPath"]))
            runtime.mounts[container["name"]] = mounts
            runtime.env[container["name"]] = self.environment(namespace, runtime, container)

    def service_account_folder(self, namespace: str, runtime: PodRuntime, pod: dict) -> str | None:
        """The API's credentials for the pod's processes, unless the pod declines them."""
        if pod["spec"].get("automountServiceAccountToken") is False:
            return None
        folder = runtime.directory / "volumes" / "kube-api-access"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "token").write_text(TOKEN)
        (folder / "namespace").write_text(namespace)
        return str(folder)

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
                mode = source.get("defaultMode", 0o644)
                items = source.get("items") or [{"key": k, "path": k} for k in files]
                for item in items:
                    if item["key"] not in files:
                        raise LookupError(f'{plural[:-1]} "{source[field]}": no key "{item["key"]}"')
                    target = folder / item["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(files[item["key"]])
                    target.chmod(item.get("mode", mode))
                return str(folder)
        raise LookupError(f"volume {volume['name']}: this fake kubelet cannot provide it")

    def environment(self, namespace: str, runtime: PodRuntime, container: dict) -> dict[str, str]:
        env = {
            "PATH": f"{VENV_BIN}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": "/root",
            "HOSTNAME": runtime.hostname,
            # Set in every container, whatever enableServiceLinks says: how clients find the API.
            "KUBERNETES_SERVICE_HOST": GATEWAY,
            "KUBERNETES_SERVICE_PORT": str(self.api_port),
        }
        for source in container.get("envFrom") or []:  # every key of a Secret or ConfigMap; env wins
            kind, ref = (
                ("secrets", source["secretRef"])
                if "secretRef" in source
                else ("configmaps", source["configMapRef"])
            )
            found = self.store.objects.get(("api/v1", namespace, kind, ref["name"]))
            if found is None:
                if ref.get("optional"):
                    continue
                raise LookupError(f'{kind[:-1]} "{ref["name"]}" not found')
            for name, value in (found.get("data") or {}).items():
                env[name] = base64.b64decode(value).decode() if kind == "secrets" else value
        for item in container.get("env") or []:
            if "value" in item:
                env[item["name"]] = expand(item["value"], env)
            elif "fieldRef" in item["valueFrom"]:
                env[item["name"]] = self.pod_field(runtime, item["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                ref = item["valueFrom"]["secretKeyRef"]
                secret = self.store.objects.get(("api/v1", namespace, "secrets", ref["name"]))
                if secret is None or ref["key"] not in (secret.get("data") or {}):
                    if ref.get("optional"):
                        continue
                    raise LookupError(f'secret "{ref["name"]}" or its key "{ref["key"]}" not found')
                env[item["name"]] = base64.b64decode(secret["data"][ref["key"]]).decode()
        return env

    def pod_field(self, runtime: PodRuntime, path: str) -> str:
        """The downward API's fields a variable can take."""
        pod = self.store.objects[runtime.key]
        meta = pod["metadata"]
        if path.startswith("metadata.labels['"):
            return (meta.get("labels") or {}).get(path[len("metadata.labels['") : -2], "")
        fields = {
            "metadata.name": meta["name"],
            "metadata.namespace": runtime.key[1],
            "metadata.uid": meta["uid"],
            "status.podIP": runtime.ip or "",
            "spec.nodeName": "fake-node",
        }
        if path not in fields:
            raise LookupError(f"fieldRef {path}: this fake kubelet cannot provide it")
        return fields[path]

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

    def in_pod(self, runtime: PodRuntime, spec: Path, container: str) -> list[str]:
        """The command that runs ``spec`` in the pod: in its network namespace and, with a memory
        limit, in the container's memory cgroup (joined first: ``ip netns exec`` hides /sys/fs/cgroup)."""
        argv = [
            "ip", "netns", "exec", runtime.netns, "unshare", "--uts", "--mount", "--propagation", "private",
            sys.executable, str(CONTAINER_SHIM), str(spec),
        ]  # fmt: skip
        if (cgroup := runtime.cgroups.get(container)) is not None:
            join = 'echo $$ > "$0/cgroup.procs" && exec "$@"'
            argv = ["sh", "-c", join, str(cgroup), *argv]
        return argv

    async def run_init_containers(self, runtime: PodRuntime, pod: dict) -> bool:
        """Each init container to its end, in order; the first that fails fails the pod."""
        for container in pod["spec"].get("initContainers") or []:
            state = await self.start_process(runtime, container)
            await self.pump_log(state)
            code = await state.process.wait()
            if code != 0:
                terminated = {"terminated": {"exitCode": code, "reason": "Error"}}
                status = {"name": container["name"], "image": container.get("image", ""), "imageID": ""}
                status.update({"ready": False, "restartCount": 0, "state": terminated})
                self.set_status(runtime.key, phase="Failed", initContainerStatuses=[status])
                return False
        return True

    async def start_container(self, runtime: PodRuntime, pod: dict, container: dict) -> None:
        runtime.containers[container["name"]] = await self.start_process(runtime, container)

    async def start_process(self, runtime: PodRuntime, container: dict) -> Container:
        command = container.get("command") or self.entrypoint(container.get("image", ""))
        argv = [*command, *container.get("args", [])]
        limit = ((container.get("resources") or {}).get("limits") or {}).get("memory")
        if limit and self.memory.available():
            pod = f"{runtime.key[1]}-{runtime.key[3]}-{runtime.number}"
            runtime.cgroups[container["name"]] = self.memory.make(pod, container["name"], limit)
        spec = self.container_spec(runtime, container, argv)
        state = Container(container["name"], runtime.directory / f"{container['name']}.log")
        state.log_path.touch()
        state.process = await asyncio.create_subprocess_exec(
            *self.in_pod(runtime, spec, container["name"]),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        return state

    async def watch_container(self, runtime: PodRuntime, container: Container, started: str) -> None:
        await self.pump_log(container)
        code = await container.process.wait()
        container.exit_code = 128 - code if code < 0 else code  # killed by signal N: 128 + N
        cgroup = runtime.cgroups.get(container.name)
        if cgroup is not None and self.memory.oom_killed(cgroup):
            container.reason = "OOMKilled"
        container.done.set()
        self.container_ended(runtime, container, started)

    async def pump_log(self, container: Container) -> None:
        """The container's output into its log, each line stamped as kubelet does."""
        with open(container.log_path, "ab", buffering=0) as log:
            partial = b""
            while chunk := await container.process.stdout.read(65536):
                partial += chunk
                *lines, partial = partial.split(b"\n")
                if lines:
                    log.write(b"".join(f"{log_timestamp()} ".encode() + line + b"\n" for line in lines))
            if partial:
                log.write(f"{log_timestamp()} ".encode() + partial + b"\n")

    def container_ended(self, runtime: PodRuntime, container: Container, started: str) -> None:
        pod = self.store.objects.get(runtime.key)
        if pod is None:
            return
        statuses = pod["status"].get("containerStatuses") or []
        for status in statuses:
            if status["name"] == container.name:
                reason = container.reason or ("Completed" if container.exit_code == 0 else "Error")
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

    async def terminate(self, key: tuple, grace: float, failed: tuple[str, str] | None = None) -> None:
        """SIGTERM every process of the pod, SIGKILL after ``grace``; then the pod is gone (or, when
        it ``failed`` - evicted, past its deadline - Failed with that reason and message, and kept)."""
        runtime = self.runtimes.get(key)
        if runtime is None:
            self.store.remove(key)
            return
        if runtime.terminating:
            if runtime.evicted and not failed:  # its processes are gone already: the object goes now
                await self.forget(key)
            return
        runtime.terminating = True
        runtime.evicted = failed is not None
        if runtime.task is not None and not runtime.containers:
            runtime.task.cancel()
        if failed:  # said first, as kubelet does: the containers' ends must not read as the reason
            self.set_status(key, phase="Failed", reason=failed[0], message=failed[1])
        if runtime.netns:
            await self.kill_all(runtime, grace)
        if not failed:
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
        for container, cgroup in (runtime.cgroups if runtime is not None else {}).items():
            self.memory_peaks[f"{key[1]}/{key[3]}/{container}"] = self.memory.peak(cgroup)
            await asyncio.to_thread(self.memory.remove, cgroup)  # once the kernel has let it go
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
        if refused := _invalid(prefix, plural, name, obj):
            return refused
        training_job = prefix == KUBEFLOW_GROUP and plural in KUBEFLOW_KINDS
        if prefix.startswith("apis/kubeflow.org/") and not (training_job and self.training_operator):
            return status_error(404, "NotFound", "the server could not find the requested resource")
        if training_job and (refused := self.admit_training_job(plural, obj)):
            kind = KUBEFLOW_KINDS[plural]["kind"]
            return status_error(422, "Invalid", f'{kind}.kubeflow.org "{name}" is invalid: {refused}')
        isvc = prefix == KSERVE and plural == "inferenceservices"
        if isvc and (refused := admit_inference_service(obj)):
            return status_error(
                422, "Invalid", f'InferenceService.serving.kserve.io "{name}" is invalid: {refused}'
            )
        key = (prefix, namespace, plural, name)
        if key in self.store.objects:
            return status_error(409, "AlreadyExists", f'{plural} "{name}" already exists')
        if plural == "secrets":
            _fold_string_data(obj)
        meta.update(namespace=namespace, uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339())
        if plural == "pods" and (refused := admit(obj, self.limit_ranges(namespace))):
            code, message = refused
            if code == 403:
                return status_error(403, "Forbidden", f'pods "{name}" is forbidden: {message}')
            return status_error(422, "Invalid", f'Pod "{name}" is invalid: {message}')
        if plural == "pods":
            obj["status"] = {"phase": "Pending"}
            obj = self.scheduler.admitted(obj)
        self.store.put(key, obj, "ADDED")
        if plural == "pods":
            number = next(self.pod_numbers)
            runtime = PodRuntime(key, number, self.root / "pods" / f"{namespace}-{name}-{number}")
            runtime.directory.mkdir(parents=True)
            self.runtimes[key] = runtime
            runtime.task = asyncio.create_task(self.run_pod(key))
        if plural == "services":
            self.publish_names(namespace)
            asyncio.ensure_future(self.service_created(key))
        if prefix == APPS and plural == "deployments":
            self.deployment_changed(key, None)
        if training_job and self.training_operator == "run":
            self.start_training_job(key)
        if isvc:
            self.inference_service_changed(key, None)
        return web.json_response(obj, status=201)

    def replace(self, key: tuple, obj: dict) -> web.Response:
        """PUT: the object as sent, with what the server keeps (uid, creation, a Service's address)."""
        current = self.store.objects.get(key)
        if current is None:
            return status_error(404, "NotFound", f'{key[2]} "{key[3]}" not found')
        if refused := _invalid(key[0], key[2], key[3], obj):
            return refused
        meta = obj.setdefault("metadata", {})
        for kept in ("uid", "creationTimestamp", "generation"):
            if kept in current["metadata"]:
                meta[kept] = current["metadata"][kept]
        meta["namespace"] = key[1]
        if key[2] == "secrets":
            _fold_string_data(obj)
        if key[2] == "services":
            for kept in ("clusterIP", "clusterIPs"):
                if kept in current["spec"]:
                    obj["spec"][kept] = current["spec"][kept]
        if "status" in current:
            obj.setdefault("status", current["status"])
        old_spec = current.get("spec")
        self.store.put(key, obj, "MODIFIED")
        self.spec_changed(key, old_spec)
        return web.json_response(obj)

    def spec_changed(self, key: tuple, old_spec: dict | None) -> None:
        """What a controller does when an object it runs is changed (replaced or patched)."""
        if key[2] == "deployments":
            self.deployment_changed(key, old_spec)
        if key[2] == "inferenceservices":
            self.inference_service_changed(key, old_spec)

    def limit_ranges(self, namespace: str) -> list[dict]:
        return [o for k, o in self.store.objects.items() if k[:3] == ("api/v1", namespace, "limitranges")]

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
            if key[2] == "services":
                await self.service_deleted(key)
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


def _invalid(prefix: str, plural: str, name: str, obj: dict) -> web.Response | None:
    """Admission of a core or apps object: kubernetes-validate (strict) for the cluster's version."""
    if prefix not in ("api/v1", APPS):
        return None
    if plural in KINDS:  # as the API server does: a body may leave out what the path says
        obj.setdefault("apiVersion", prefix.removeprefix("api/").removeprefix("apis/"))
        obj.setdefault("kind", KINDS[plural])
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as error:
        message = str(error).splitlines()[0]
        return status_error(422, "Invalid", f'{KINDS.get(plural, plural)} "{name}" is invalid: {message}')
    return None


def _fold_string_data(secret: dict) -> None:
    """``stringData`` into ``data`` (base64), as the API server stores a Secret."""
    for name, value in (secret.pop("stringData", None) or {}).items():
        secret.setdefault("data", {})[name] = base64.b64encode(value.encode()).decode()
