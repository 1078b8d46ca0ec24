"""``http://`` and ``https://`` for Airflow's ObjectStoragePath (no provider registers them), so an input
can be downloaded from a web server: fsspec's HTTP filesystem, with the connection's credentials (login
and password: basic authentication; extra ``headers``: sent with every request).

A connection's credentials go only to its own server: its host, and its scheme and port where it
names them. An input whose (templated, perhaps conf-given) URI points elsewhere with that connection
fails before any request, naming the input.
"""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlsplit

schemes = ["http", "https"]


def request_headers(conn_id: str | None) -> dict[str, str]:
    """The headers every request carries for the connection: its extra ``headers``, and basic
    authentication from its login and password."""
    if not conn_id:
        return {}
    from airflow.sdk import BaseHook

    connection = BaseHook.get_connection(conn_id)
    headers = dict(connection.extra_dejson.get("headers", {}))
    if connection.login:
        pair = f"{connection.login}:{connection.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(pair).decode()
    return headers


def check_destination(conn_id: str | None, uri: str, field: str) -> None:
    """``ValueError`` naming ``field`` unless ``uri`` is on the connection's own server (or the
    connection has no credentials to give away)."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        if not conn_id or not request_headers(conn_id):
            return
        connection = BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:  # said, naming the input, when it is read
        return
    allowed = _origin_of(connection)
    target = urlsplit(uri)
    wanted = (
        target.scheme,
        (target.hostname or "").lower(),
        target.port or _DEFAULT_PORTS.get(target.scheme),
    )
    if allowed is None or any(a is not None and a != w for a, w in zip(allowed, wanted, strict=True)):
        where = "names no host" if allowed is None else f"is for {_shown(allowed)}"
        raise ValueError(
            f"{field}: connection {conn_id!r} {where}; its credentials are not sent to "
            f"{target.scheme}://{target.netloc.rpartition('@')[2]}"
        )


_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin_of(connection) -> tuple[str | None, str, int | None] | None:
    """(scheme or None: either, host, port or None: the scheme's) the connection's credentials are for."""
    host = (connection.host or "").strip()
    if not host:
        return None
    parsed = urlsplit(host if "://" in host else f"//{host}")
    scheme = parsed.scheme or (connection.schema if connection.schema in _DEFAULT_PORTS else None)
    port = connection.port or parsed.port or (_DEFAULT_PORTS.get(scheme) if scheme else None)
    return scheme, (parsed.hostname or "").lower(), port


def _shown(origin: tuple) -> str:
    scheme, host, port = origin
    return f"{scheme or 'http(s)'}://{host}{f':{port}' if port else ''}"


def get_fs(conn_id: str | None, storage_options: dict[str, Any] | None = None):
    from fsspec.implementations.http import HTTPFileSystem

    options = dict(storage_options or {})
    if headers := request_headers(conn_id):
        client = dict(options.get("client_kwargs") or {})
        client["headers"] = {**headers, **client.get("headers", {})}
        options["client_kwargs"] = client
    return HTTPFileSystem(**options)
