"""Real SSH hosts on this machine, for the tests of multi-host launchers.

Each host is an ``sshd`` in a network namespace of its own, with its own host name (a UTS namespace),
an address on a private test subnet that exists only inside namespaces created here (their veths meet
on a bridge in one more namespace), and an ``/etc/hosts`` naming every host. Hosts reach each other
by name or address over that subnet, as machines on a LAN do. The test process reaches each sshd on
127.0.0.1 through a forwarder that opens its connections inside the host's namespace, so no traffic
leaves loopback or those namespaces. All hosts share this machine's file system (the project's venv
is every host's interpreter, called by absolute path since sshd's PATH is the default one).

Everything is started and stopped by PID and by namespace name; nothing else on the machine is touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

SUBNET = "10.213.0.{}"
CLONE_NEWNET = 0x40000000
SSHD = "/usr/sbin/sshd"
_sets = itertools.count()


@dataclass
class SSHHost:
    name: str  # its host name, resolvable by name on every host
    namespace: str
    address: str  # on the test subnet
    port: int = 0  # on 127.0.0.1 in the test's namespace, forwarded to the host's sshd
    host_key: str = ""  # "ssh-ed25519 AAAA...": what a connection pins
    sshd: subprocess.Popen | None = None

    def pids(self) -> list[int]:
        """Every process on the host (all hosts share this machine's PID namespace, not its network)."""
        return _namespace_pids(self.namespace)

    def job_processes(self) -> dict[int, str]:
        """pid -> command line of every process on the host but sshd and its sessions."""
        found = {}
        for pid in self.pids():
            try:
                if not _is_sshd(pid):
                    found[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue  # gone meanwhile
        return found

    def sshd_pids(self) -> list[int]:
        """The host's sshd and every session it serves."""
        found = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                if _is_sshd(pid):
                    found.append(pid)
        return found

    def drop_sessions(self) -> list[int]:
        """SIGKILL every session the host's sshd serves, the listener kept: each connection to the host
        drops, and a new one is accepted. The pids killed."""
        sessions = [pid for pid in self.sshd_pids() if pid != self.sshd.pid]
        for pid in sessions:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return sessions


@dataclass
class SSHHosts:
    root: Path
    count: int = 3
    user: str = field(default_factory=lambda: os.environ.get("USER") or "root")
    hosts: list[SSHHost] = field(default_factory=list)
    _forwarders: list[NamespaceForwarder] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Unique on the machine while it runs; the subnet can be the same for every set of hosts,
        # since each set's bridge is in a namespace of its own.
        self.prefix = f"dnt{os.getpid() % 100000}-{next(_sets)}"
        self.bridge_namespace = f"{self.prefix}-br"
        self.client_key = self.root / "id_ed25519"
        self.known_hosts = self.root / "known_hosts"

    # -- start -------------------------------------------------------------------------------------

    def start(self) -> SSHHosts:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege separation directory
        _keygen(self.client_key)
        (self.root / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.hosts = [
            SSHHost(f"{self.prefix}-h{i}", f"{self.prefix}-h{i}", SUBNET.format(10 + i))
            for i in range(self.count)
        ]
        try:
            self._network()
            for host in self.hosts:
                self._start_sshd(host)
                forwarder = NamespaceForwarder(host.namespace, host.address, 22)
                self._forwarders.append(forwarder)
                host.port = forwarder.port
            known = [f"{h.name},{h.address},[127.0.0.1]:{h.port} {h.host_key}\n" for h in self.hosts]
            self.known_hosts.write_text("".join(known))
            for host in self.hosts:
                _wait_for_banner(host.port)
        except BaseException:
            self.stop()
            raise
        return self

    def _network(self) -> None:
        _ip("netns", "add", self.bridge_namespace)
        _ip("-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.bridge_namespace, "link", "set", "br0", "up")
        etc_hosts = "127.0.0.1 localhost\n" + "".join(f"{h.address} {h.name}\n" for h in self.hosts)
        for index, host in enumerate(self.hosts):
            _ip("netns", "add", host.namespace)
            # Both ends are created directly in namespaces of ours: nothing appears in this one.
            peer = f"v{index}"
            _ip("link", "add", "eth0", "netns", host.namespace, "type", "veth", "peer", "name", peer,
                "netns", self.bridge_namespace)  # fmt: skip
            _ip("-n", self.bridge_namespace, "link", "set", peer, "master", "br0", "up")
            _ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.namespace, "link", "set", "eth0", "up")
            _ip("-n", host.namespace, "link", "set", "lo", "up")
            etc = Path("/etc/netns") / host.namespace  # `ip netns exec` mounts these over /etc
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(etc_hosts)

    def _start_sshd(self, host: SSHHost) -> None:
        home = self.root / host.name
        home.mkdir()
        host_key = home / "ssh_host_ed25519_key"
        _keygen(host_key)
        host.host_key = " ".join(host_key.with_suffix(".pub").read_text().split()[:2])
        config = home / "sshd_config"
        config.write_text(
            "\n".join(
                [
                    f"ListenAddress {host.address}:22",
                    f"HostKey {host_key}",
                    f"PidFile {home / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.root / 'authorized_keys'}",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PermitRootLogin prohibit-password",
                    "StrictModes no",  # the keys live under a temporary directory
                    "Subsystem sftp internal-sftp",
                    "MaxStartups 64",
                    "MaxSessions 64",
                    "LogLevel ERROR",
                    "",
                ]
            )
        )
        self._launch_sshd(host, config)

    def _launch_sshd(self, host: SSHHost, config: Path) -> None:
        with open(self.root / host.name / "sshd.log", "a") as log:
            host.sshd = subprocess.Popen(
                ["ip", "netns", "exec", host.namespace, "unshare", "--uts", "sh", "-c",
                 f'hostname "$1" && exec {SSHD} -D -e -f "$2"', "sh", host.name, str(config)],
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )  # fmt: skip

    def airflow_connection(self, host: SSHHost, **extra) -> str:
        """The Airflow SSH connection (JSON, for an ``AIRFLOW_CONN_...`` variable) a user would define
        for ``host``: the client key, the host key pinned, and the address its peers reach it at."""
        extra = {
            "key_file": str(self.client_key),
            "host_key": host.host_key,
            "address": host.address,
            "authorized_keys_file": str(self.root / "authorized_keys"),  # the file every sshd here reads
        } | extra
        uri = {"conn_type": "ssh", "host": "127.0.0.1", "port": host.port, "login": self.user, "extra": extra}
        return json.dumps(uri)

    def host_list_connection(self) -> str:
        """One Airflow SSH connection naming every host (extra ``hosts``), as JSON."""
        entries = [
            {"host": "127.0.0.1", "port": h.port, "address": h.address, "host_key": h.host_key}
            for h in self.hosts
        ]
        extra = {
            "key_file": str(self.client_key),
            "hosts": entries,
            "authorized_keys_file": str(self.root / "authorized_keys"),
        }
        return json.dumps({"conn_type": "ssh", "login": self.user, "extra": extra})

    def reach(self, host: SSHHost, port: int) -> int:
        """A port on 127.0.0.1 here whose connections reach ``port`` at the host's address (a server
        it runs for the network, such as an endpoint), as a client on the hosts' LAN would."""
        forwarder = NamespaceForwarder(host.namespace, host.address, port)
        self._forwarders.append(forwarder)
        return forwarder.port

    def cut_off(self, host: SSHHost) -> None:
        """The host drops off the network: its link goes down (its peers lose it) and the connections
        from this machine stall (so does the launcher)."""
        _ip("-n", host.namespace, "link", "set", "eth0", "down")
        self._forwarders[self.hosts.index(host)].cut.set()

    def reconnect(self, host: SSHHost) -> None:
        """The host is back after :meth:`cut_off`, as after a link flap: what was sent meanwhile arrives
        now (TCP retransmits it), and connections made meanwhile go through."""
        _ip("-n", host.namespace, "link", "set", "eth0", "up")
        self._forwarders[self.hosts.index(host)].cut.clear()

    def restart_sshd(self, host: SSHHost, down_for: float) -> list[int]:
        """The host's sshd and every session it serves killed (as a restart by a package upgrade does,
        at its worst), and a new sshd started ``down_for`` seconds later; the processes its sessions
        started live on. The pids killed."""
        killed = host.sshd_pids()
        for pid in killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        host.sshd.wait(timeout=10)
        time.sleep(down_for)
        self._launch_sshd(host, self.root / host.name / "sshd_config")
        _wait_for_banner(host.port)
        return killed

    # -- stop --------------------------------------------------------------------------------------

    def stop(self) -> None:
        for forwarder in self._forwarders:
            forwarder.close()
        for host in self.hosts:
            if host.sshd is not None and host.sshd.poll() is None:
                host.sshd.terminate()
        for namespace in [h.namespace for h in self.hosts] + [self.bridge_namespace]:
            _kill_namespace(namespace)
        for host in self.hosts:
            if host.sshd is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    host.sshd.wait(timeout=10)
            shutil.rmtree(Path("/etc/netns") / host.namespace, ignore_errors=True)

    def __enter__(self) -> SSHHosts:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _is_sshd(pid: int) -> bool:
    return Path(f"/proc/{pid}/comm").read_text().strip() == "sshd"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


def _keygen(path: Path) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        capture_output=True,
        timeout=30,
    )


def _namespace_pids(namespace: str) -> list[int]:
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30)
    return [int(pid) for pid in listed.stdout.split()]


def _kill_namespace(namespace: str) -> None:
    """Every process in the namespace (what sshd's sessions left too), then the namespace."""
    if not Path("/run/netns", namespace).exists():
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _namespace_pids(namespace):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while _namespace_pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.05)
    subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)


def _wait_for_banner(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
                if connection.recv(64).startswith(b"SSH-"):
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no sshd answered on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.05)


class NamespaceForwarder:
    """127.0.0.1:port here → address:port inside ``namespace``: each connection is opened by a thread
    that joined the namespace (``setns`` applies to the calling thread only). Once ``cut``, it holds
    every byte in both directions and connects nothing, as a network that lost the host does: connections
    stall rather than fail. Once no longer cut, the held bytes flow and the held connections are made,
    as TCP's retransmissions make a short outage."""

    def __init__(self, namespace: str, address: str, port: int) -> None:
        self.namespace, self.target = namespace, (address, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.cut = threading.Event()
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        _wait_while(self.cut)
        try:
            with open(f"/run/netns/{self.namespace}") as namespace:  # gone once the hosts are stopped
                if ctypes.CDLL(None, use_errno=True).setns(namespace.fileno(), CLONE_NEWNET) != 0:
                    client.close()
                    return
        except OSError:
            client.close()
            return
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        self.connections.append(upstream)
        back = threading.Thread(target=_pump, args=(upstream, client, self.cut), daemon=True)
        back.start()
        _pump(client, upstream, self.cut)
        back.join()
        for connection in (client, upstream):  # both ways ended: let go of them
            with contextlib.suppress(ValueError):
                self.connections.remove(connection)
            connection.close()

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        for connection in self.connections:
            with contextlib.suppress(OSError):
                connection.close()
        self.cut.clear()  # what it held ends on the closed connections


def _pump(source: socket.socket, sink: socket.socket, cut: threading.Event) -> None:
    try:
        while data := source.recv(65536):
            _wait_while(cut)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        _wait_while(cut)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def _wait_while(cut: threading.Event) -> None:
    while cut.is_set():
        time.sleep(0.1)
