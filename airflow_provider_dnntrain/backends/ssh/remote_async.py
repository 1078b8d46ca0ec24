"""A host as the SSH launcher's trigger reaches it: through the ssh provider's async hook
(``SSHHookAsync``, asyncssh) on the triggerer's event loop, one connection kept for the whole wait,
host keys verified by the hook's rules, every step bounded, the agent run by argv, never by shell text."""

from __future__ import annotations

import asyncio
import json
import logging
import shlex
from collections.abc import Sequence
from typing import Any

from airflow_provider_dnntrain.backends.ssh.remote import (
    CONNECT_TIMEOUT_SECONDS,
    KEEPALIVE_SECONDS,
    HostKeyRefused,
    HostSpec,
    HostUnreachable,
    RemoteCommandFailed,
)

# asyncssh says five lines at INFO for every command: with a poll per second per host, most of a task
# log. Unless someone chose its level, only its warnings.
if logging.getLogger("asyncssh").level == logging.NOTSET:
    logging.getLogger("asyncssh").setLevel(logging.WARNING)


class AsyncRemoteHost:
    def __init__(self, spec: HostSpec, label: str) -> None:
        self.spec = spec
        self.label = label
        self._connection: Any = None

    async def _connect(self):
        if self._connection is None:
            from airflow.providers.ssh.hooks.ssh import SSHHookAsync

            hook = SSHHookAsync(
                ssh_conn_id=self.spec.conn_id,
                host=self.spec.host,
                port=self.spec.port,
                keepalive_interval=KEEPALIVE_SECONDS,
            )
            if self.spec.host_key:  # a host list entry's own pinned key
                key = " ".join(self.spec.host_key.split()[:2])
                hook.known_hosts = f"{self.spec.host} {key}".encode()
            self._connection = await asyncio.wait_for(hook.get_conn(), CONNECT_TIMEOUT_SECONDS)
        return self._connection

    async def run_json(self, argv: Sequence[str], timeout: float) -> dict:
        """Run ``argv`` (quoted for the remote shell), connecting first if need be, within ``timeout``."""
        import asyncssh

        try:
            connection = await self._connect()
            result = await asyncio.wait_for(connection.run(shlex.join(argv), check=False), timeout)
        except asyncssh.HostKeyNotVerifiable as error:
            raise HostKeyRefused(f"host {self.spec}: {error}; not connecting") from None
        except (OSError, TimeoutError, asyncssh.Error) as error:
            self.close()
            raise HostUnreachable(f"host {self.spec}: {type(error).__name__}: {error}") from error
        if result.exit_status != 0:
            detail = str(result.stderr or "").strip()[-2000:]
            raise RemoteCommandFailed(
                f"host {self.spec}: {list(argv[:4])} exited {result.exit_status}: {detail}"
            )
        return json.loads(result.stdout)

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()
