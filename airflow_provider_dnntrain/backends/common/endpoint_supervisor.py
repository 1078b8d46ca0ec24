"""An endpoint on one host: its public port, the versions it serves, and their supervision.

Started detached by a deploy task (it outlives the task) with the endpoint's folder:

- ``endpoint.json`` (the deploy task's): ``{"host", "port"}`` - where the endpoint listens;
- ``desired.json`` (the deploy task's): ``{"active": slot, "slots": {slot: {"python", "model_dir",
  "version"}}}`` - the versions that should run, and the one that takes the traffic (a version's
  files, which the deploy task copied into ``versions/``, are removed when its slot stops);
- ``key.sha256``: the endpoint key's hash, handed to each version's server;
- ``status.json`` (this process's): what runs - the active slot, and every slot's version, private
  port, server pid (None while it is down) and how many times it was started.

Each version is :mod:`model_server` on a private loopback port this process holds (a restarted server
gets the same socket: requests wait in its backlog), restarted when it dies. Connections to the public
port are relayed to the active slot; a switch sends new connections to the new slot. ``SIGHUP``:
read ``desired.json`` again. ``SIGTERM``: stop every version and end. Standard library only.

Run: ``python endpoint_supervisor.py ENDPOINT_DIR``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time

try:
    from airflow_provider_dnntrain.backends.common.model_server import KEY_HASH_VAR, VERSION_VAR
except ImportError:  # run as a script, beside model_server.py
    from model_server import KEY_HASH_VAR, VERSION_VAR

MODEL_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_server.py")
RESTART_DELAYS = (1, 2, 5, 10, 30)  # seconds before the 1st, 2nd, ... restart (then the last again)


def write_json(path: str, value: dict) -> None:
    """Whole or not at all: a reader never sees half a file."""
    partial = f"{path}.partial"
    with open(partial, "w") as handle:
        json.dump(value, handle)
    os.replace(partial, path)


def read_json(path: str) -> dict:
    with open(path) as handle:
        return json.load(handle)


class Slot:
    """One version: its private socket, and its server, started again whenever it ends."""

    def __init__(self, supervisor: Supervisor, name: str, spec: dict) -> None:
        self.supervisor, self.name, self.spec = supervisor, name, spec
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self.listener.getsockname()[1]
        self.process: asyncio.subprocess.Process | None = None
        self.starts = 0
        self.stopping = False
        self.task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while not self.stopping:
            self.starts += 1
            try:
                self.process = await self._start()
                self.supervisor.publish()
                ended = f"ended ({await self.process.wait()})"
            except OSError as error:
                ended = f"could not start ({error})"
            if self.stopping:
                break
            delay = RESTART_DELAYS[min(self.starts - 1, len(RESTART_DELAYS) - 1)]
            self.supervisor.say(f"{self.name}: server {ended}; again in {delay}s")
            self.supervisor.publish()
            await asyncio.sleep(delay)

    async def _start(self) -> asyncio.subprocess.Process:
        env = {**os.environ, KEY_HASH_VAR: self.supervisor.key_hash, VERSION_VAR: self.spec["version"]}
        log = open(os.path.join(self.supervisor.folder, "logs", f"{self.name}.log"), "ab")  # noqa: SIM115
        with log:
            argv = [self.spec["python"], MODEL_SERVER, self.spec["model_dir"], str(self.listener.fileno())]
            return await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                pass_fds=(self.listener.fileno(),), start_new_session=True,
            )  # fmt: skip

    async def stop(self) -> None:
        self.stopping = True
        if self.process is not None and self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), 15)
            except asyncio.TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
        self.task.cancel()
        self.listener.close()

    def described(self) -> dict:
        running = self.process is not None and self.process.returncode is None
        pid = self.process.pid if running else None
        return {"port": self.port, "pid": pid, "starts": self.starts, "version": self.spec["version"]}


class Supervisor:
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.slots: dict[str, Slot] = {}
        self.active: str | None = None
        with open(os.path.join(folder, "key.sha256")) as handle:
            self.key_hash = handle.read().strip()
        self.done = asyncio.Event()
        self._reconciling = asyncio.Lock()  # two quick SIGHUPs: one after the other

    def say(self, text: str) -> None:
        print(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}", flush=True)

    def publish(self) -> None:
        slots = {name: slot.described() for name, slot in self.slots.items()}
        write_json(
            os.path.join(self.folder, "status.json"),
            {"pid": os.getpid(), "active": self.active, "slots": slots},
        )

    async def reconcile(self) -> None:
        async with self._reconciling:
            await self._reconcile()

    async def _reconcile(self) -> None:
        desired = read_json(os.path.join(self.folder, "desired.json"))
        wanted = desired.get("slots", {})
        for name in [n for n in self.slots if n not in wanted or self.slots[n].spec != wanted[n]]:
            stopped = self.slots.pop(name)
            await stopped.stop()
            self.say(f"{name}: stopped")
            if all(spec["model_dir"] != stopped.spec["model_dir"] for spec in wanted.values()):
                shutil.rmtree(stopped.spec["model_dir"], ignore_errors=True)  # the deploy task's copy
        for name, spec in wanted.items():
            if name not in self.slots:
                self.slots[name] = Slot(self, name, spec)
                self.say(f"{name}: serving {spec['version']} on 127.0.0.1:{self.slots[name].port}")
        self.active = desired.get("active") if desired.get("active") in self.slots else None
        self.publish()

    async def relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One client connection, carried to the slot that was active when it came."""
        slot = self.slots.get(self.active or "")
        if slot is None:
            writer.close()
            return
        # asyncio leaves Nagle on for sockets accepted from a listener made without IPPROTO_TCP: a
        # response's second write would wait for the client's delayed ACK (40 ms).
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", slot.port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    async def stop(self) -> None:
        for name in list(self.slots):
            await self.slots.pop(name).stop()
        self.publish()
        self.done.set()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(folder: str) -> None:
    where = read_json(os.path.join(folder, "endpoint.json"))
    supervisor = Supervisor(folder)
    os.makedirs(os.path.join(folder, "logs"), exist_ok=True)
    listener = socket.create_server((where["host"], where["port"]), backlog=1024)
    server = await asyncio.start_server(supervisor.relay, sock=listener)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(supervisor.reconcile()))
    for stop in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(stop, lambda: asyncio.ensure_future(supervisor.stop()))
    await supervisor.reconcile()
    supervisor.say(f"endpoint listening on {where['host']}:{where['port']}")
    await supervisor.done.wait()
    server.close()


def event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where it is installed (uvicorn's own choice: a relay hop costs half as much), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


if __name__ == "__main__":
    with asyncio.Runner(loop_factory=event_loop) as runner:
        runner.run(serve(sys.argv[1]))
