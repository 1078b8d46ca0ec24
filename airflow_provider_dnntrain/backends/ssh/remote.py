"""SSH hosts as the SSH launcher sees them: from Airflow connections, through the ssh provider's hook,
with host keys verified, bounded timeouts everywhere, and the agent run by argv, never by shell text."""

from __future__ import annotations

import contextlib
import io
import json
import posixpath
import shlex
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

CONNECT_TIMEOUT_SECONDS = 10
# SSH keepalives this often, so a dead link shows as a failed command rather than a hang.
KEEPALIVE_SECONDS = 5
# Transient connection failures (sshd restarting, a busy host) are retried within this long.
CONNECT_RETRY_SECONDS = 15
SFTP_TIMEOUT_SECONDS = 30  # without a byte either way: a stalled link, not a big file


class HostUnreachable(RuntimeError):
    """A host could not be reached or did not answer in time."""


class HostKeyRefused(RuntimeError):
    """A host presented a key that is unknown or does not match: the launcher does not connect."""


class RemoteCommandFailed(RuntimeError):
    """A command on a host exited non-zero."""


@dataclass(frozen=True)
class HostSpec:
    """One host: the connection that reaches it from Airflow, and the address its peers use."""

    conn_id: str
    host: str  # how this worker connects (the connection's host, or an entry of its host list)
    port: int | None = None
    address: str | None = None  # how the other hosts reach it; defaults to ``host``
    host_key: str | None = None  # pinned key for an entry of a host list
    peer_port: int | None = None  # the sshd port the other hosts use, when not the connection's
    authorized_keys: str = ".ssh/authorized_keys"  # where a run's own key is authorized, for its peers
    python: str | None = None  # this host's interpreter for the job, when not the launcher's

    @property
    def peer_address(self) -> str:
        return self.address or self.host

    def __str__(self) -> str:
        return f"{self.peer_address} (connection {self.conn_id!r})"


def hosts_from_connections(conn_ids: Sequence[str]) -> list[HostSpec]:
    """One host per connection, or several when a connection's extra has ``hosts``: a list of
    ``"name[:port]"`` or ``{"host": ..., "port": ..., "address": ..., "host_key": ...}``.
    A connection's extra ``address`` names the host as its peers reach it (a private network),
    ``peer_port`` the sshd port they use, ``authorized_keys_file`` where a run's key for its peers is
    authorized (default ``.ssh/authorized_keys``), ``python`` the job's interpreter on that host (an
    entry of a host list may name its own)."""
    from airflow.sdk import BaseHook

    hosts = []
    for conn_id in conn_ids:
        conn = BaseHook.get_connection(conn_id)
        extra = conn.extra_dejson
        listed = extra.get("hosts")
        python = extra.get("python")
        shared = {
            "peer_port": extra.get("peer_port"),
            "authorized_keys": extra.get("authorized_keys_file", ".ssh/authorized_keys"),
        }
        if not listed:
            hosts.append(
                HostSpec(conn_id, conn.host, conn.port, extra.get("address"), **shared, python=python)
            )
            continue
        for entry in listed:
            if isinstance(entry, str):
                name, _, port = entry.partition(":")
                entry = {"host": name, "port": int(port) if port else None}
            port, address, key = entry.get("port"), entry.get("address"), entry.get("host_key")
            own_python = entry.get("python", python)
            hosts.append(HostSpec(conn_id, entry["host"], port, address, key, **shared, python=own_python))
    return hosts


@dataclass
class RemoteHost:
    """A connected host. Commands on it may run from several threads at once (one channel each)."""

    spec: HostSpec
    label: str  # h0, h1...: its folder under the job's folder on the host
    client: Any = None
    _sftp: Any = None
    home: str = ""
    last_error: str = ""
    # Called with the host (its lock held) once a dropped connection is made again: what lived on the
    # old one, such as a port forward, is to be set up again there.
    on_reconnect: list[Callable[[RemoteHost], None]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self) -> RemoteHost:
        """Connected, or connect now: the first time with retries for transient failures, later (a
        dropped connection) with one attempt, so a dead host is noticed within the connect timeout."""
        with self._lock:
            transport = self.client.get_transport() if self.client is not None else None
            if transport is None or not transport.is_active():
                reconnecting = bool(self.home)
                self.client = _connect(self.spec, 0 if reconnecting else CONNECT_RETRY_SECONDS)
                self._sftp = self.client.open_sftp()
                self._sftp.get_channel().settimeout(SFTP_TIMEOUT_SECONDS)
                self.home = self._sftp.normalize(".")
                for set_up_again in self.on_reconnect if reconnecting else ():
                    set_up_again(self)
        return self

    @property
    def sftp(self):
        """One SFTP session per connection (paramiko's SFTP client is not for several threads at once:
        callers here use it from one thread per host)."""
        return self.connect()._sftp

    def run(self, argv: Sequence[str], timeout: float) -> str:
        """Run ``argv`` (quoted for the remote shell) and return its standard output; every step is
        bounded by ``timeout``, opening the channel included (paramiko's default there is an hour)."""
        import paramiko

        try:
            channel = self.connect().client.get_transport().open_session(timeout=timeout)
            channel.settimeout(timeout)
            channel.exec_command(shlex.join(argv))
            out = channel.makefile("rb").read()
            err = channel.makefile_stderr("rb").read()
            if not channel.status_event.wait(timeout):
                raise TimeoutError("no exit status")
            status = channel.exit_status
            channel.close()
            if status == -1:  # the session ended without one: sshd or the connection died
                raise EOFError("the session ended without an exit status")
        except (OSError, EOFError, paramiko.SSHException) as error:
            self.close()
            raise HostUnreachable(f"host {self.spec}: {type(error).__name__}: {error}") from error
        if status != 0:
            detail = err.decode(errors="replace").strip()[-2000:]
            raise RemoteCommandFailed(f"host {self.spec}: {argv[:4]} exited {status}: {detail}")
        return out.decode()

    def run_json(self, argv: Sequence[str], timeout: float) -> dict:
        return json.loads(self.run(argv, timeout))

    @contextlib.contextmanager
    def _reaching(self):
        """A lost connection (as opposed to a file error) surfaces as :class:`HostUnreachable`."""
        import paramiko

        try:
            yield
        except (EOFError, paramiko.SSHException, ConnectionError, TimeoutError) as error:
            self.close()
            raise HostUnreachable(f"host {self.spec}: {type(error).__name__}: {error}") from error

    def put(self, content: bytes, path: str, mode: int = 0o600) -> None:
        """Write ``content`` to ``path`` whole: a reader (or a host sharing the file system) never sees
        it half-written. Created owner-only before any byte is written."""
        self.put_stream(io.BytesIO(content), path, mode)

    def put_stream(self, stream, path: str, mode: int = 0o600) -> None:
        """:meth:`put`, reading ``stream`` a chunk at a time (a large file never sits in memory)."""
        with self._reaching():
            sftp = self.sftp
            writing = f"{path}.{uuid.uuid4().hex[:8]}.writing"
            with sftp.open(writing, "wb") as file:
                file.chmod(mode)
                file.set_pipelined(True)
                while chunk := stream.read(1 << 20):
                    file.write(chunk)
            sftp.posix_rename(writing, path)

    def put_file(self, local: Path, path: str) -> None:
        with open(local, "rb") as file:
            self.put_stream(file, path)

    def makedirs(self, path: str, mode: int = 0o700) -> None:
        with self._reaching():
            self._makedirs(path, mode)

    def _makedirs(self, path: str, mode: int) -> None:
        sftp = self.sftp
        parts = []
        for part in path.strip("/").split("/"):
            parts.append(part)
            current = "/" + "/".join(parts)
            try:
                sftp.stat(current)
                continue
            except FileNotFoundError:
                pass
            try:
                sftp.mkdir(current, mode)
            except OSError:
                sftp.stat(current)  # made meanwhile by a host sharing this file system: fine
                continue
            sftp.chmod(current, mode)  # mkdir's mode is filtered by the umask

    def get(self, path: str) -> bytes:
        buffer = io.BytesIO()
        with self._reaching():
            self.sftp.getfo(path, buffer)
        return buffer.getvalue()

    def absolute(self, path: str) -> str:
        return path if path.startswith("/") else posixpath.join(self.home, path)

    def close(self) -> None:
        client, self.client, self._sftp = self.client, None, None
        if client is not None:
            client.close()


def _connect(spec: HostSpec, retry_seconds: float):
    """A paramiko client through the ssh provider's hook: its auth, proxy and host-key rules."""
    import paramiko
    from airflow.providers.ssh.hooks.ssh import SSHHook

    hook = SSHHook(
        ssh_conn_id=spec.conn_id,
        remote_host=spec.host,
        port=spec.port,
        conn_timeout=CONNECT_TIMEOUT_SECONDS,
        banner_timeout=CONNECT_TIMEOUT_SECONDS,
        auth_timeout=CONNECT_TIMEOUT_SECONDS,
        keepalive_interval=KEEPALIVE_SECONDS,
        conn_retry_attempts=1,  # retried below, except for what no retry fixes
    )
    if spec.host_key:
        hook.host_key = _parse_host_key(spec.host_key)
    # Unknown host keys are refused whatever the ssh provider's default (older ones added them), unless
    # the connection opts out in so many words.
    hook.no_host_key_check = not spec.host_key and _opted_out_of_host_keys(spec.conn_id)
    deadline = time.monotonic() + retry_seconds
    while True:
        try:
            return hook.get_conn()
        except paramiko.BadHostKeyException as error:
            raise HostKeyRefused(
                f"host {spec}: its host key does not match the one known for it "
                f"(got {error.key.get_name()} {error.key.get_base64()[:16]}...); not connecting"
            ) from None
        except paramiko.SSHException as error:
            if "not found in known_hosts" in str(error):
                raise HostKeyRefused(
                    f"host {spec}: unknown host key. Add the host to ~/.ssh/known_hosts, or pin its key "
                    f'in connection {spec.conn_id!r} (extra "host_key"), or opt out explicitly with '
                    'extra "no_host_key_check": true'
                ) from None
            if isinstance(error, paramiko.AuthenticationException) or time.monotonic() > deadline:
                raise HostUnreachable(f"host {spec}: {type(error).__name__}: {error}") from None
        except (OSError, EOFError) as error:
            if time.monotonic() > deadline:
                raise HostUnreachable(f"host {spec}: {type(error).__name__}: {error}") from None
        time.sleep(1)


def _opted_out_of_host_keys(conn_id: str | None) -> bool:
    from airflow.sdk import BaseHook

    extra = BaseHook.get_connection(conn_id).extra_dejson if conn_id else {}
    value = extra.get("no_host_key_check", extra.get("ignore_hostkey_verification"))
    return str(value).lower() == "true"


def _parse_host_key(text: str):
    import base64

    import paramiko

    key_type, data = text.split()[:2]
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(data))


def on_each(hosts: Iterable[RemoteHost], action: Callable[[RemoteHost], T]) -> dict[str, T | BaseException]:
    """``action`` on every host at once; each host's result or the exception it raised, by label."""
    hosts = list(hosts)
    if not hosts:
        return {}
    with ThreadPoolExecutor(max_workers=len(hosts)) as pool:
        futures = {host.label: pool.submit(action, host) for host in hosts}
    results: dict[str, T | BaseException] = {}
    for label, future in futures.items():
        error = future.exception()
        results[label] = error if error is not None else future.result()
    return results


def raise_first(results: dict[str, T | BaseException]) -> dict[str, T]:
    for value in results.values():
        if isinstance(value, BaseException):
            raise value
    return results  # type: ignore[return-value]
