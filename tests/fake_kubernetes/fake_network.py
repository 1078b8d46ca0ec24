"""The fake cluster's network: a bridge in a namespace of its own, a network namespace per pod with an
address on it, names in every pod's /etc/hosts as cluster DNS would answer them, and a gateway that lets
pods reach a port on this machine's loopback."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
from pathlib import Path

CLONE_NEWNET = 0x40000000

GATEWAY = "10.215.0.1"  # this machine, as the pods see it (the bridge's address)


class PodNetwork:
    """Mixed into the cluster: uses its ``prefix``, ``bridge``, ``store`` and ``runtimes``."""

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
        await self.ip("-n", self.bridge, "addr", "add", f"{GATEWAY}/16", "dev", "br0")
        await self.ip("-n", self.bridge, "link", "set", "br0", "up")
        await self.ip("-n", self.bridge, "link", "set", "lo", "up")
        if self.gateway_port:
            await self.start_gateway(self.gateway_port)

    async def start_gateway(self, port: int) -> None:
        """10.215.0.1:<port> on the pods' network reaches 127.0.0.1:<port> here: how pods reach a
        worker that shares the cluster's network."""
        listener = await asyncio.to_thread(_listen_in_namespace, self.bridge, (GATEWAY, port))

        async def relay(reader, writer) -> None:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

        await asyncio.start_server(relay, sock=listener)

    async def pod_network(self, runtime) -> None:
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
            labels = pod["metadata"].get("labels") or {}
            service = services.get(pod["spec"].get("subdomain", ""))
            selector = (service or {}).get("spec", {}).get("selector") or {}
            if service and selector and _selects(selector, labels):
                sub = pod["spec"]["subdomain"]
                names = [f"{hostname}.{sub}.{namespace}.svc.cluster.local", f"{hostname}.{sub}", hostname]
            for name, other in services.items():  # a headless Service's name is its pods' addresses
                chosen = other["spec"].get("selector") or {}
                if chosen and name != pod["spec"].get("subdomain") and _selects(chosen, labels):
                    names += [f"{name}.{namespace}.svc.cluster.local", f"{name}.{namespace}.svc", name]
            lines.append(f"{runtime.ip} {' '.join(dict.fromkeys(names))}")
        lines += self.cluster_ip_names(namespace)
        text = "\n".join(lines) + "\n"
        for runtime in self.runtimes.values():
            if runtime.key[1] == namespace and runtime.netns:
                path = Path("/etc/netns") / runtime.netns / "hosts"
                with contextlib.suppress(OSError), open(path, "r+") as handle:
                    handle.seek(0)
                    handle.write(text)
                    handle.truncate()


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


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
