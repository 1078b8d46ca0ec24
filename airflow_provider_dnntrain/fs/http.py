"""``http://`` and ``https://`` for Airflow's ObjectStoragePath (no provider registers them), so an input
can be downloaded from a web server: fsspec's HTTP filesystem, with the connection's credentials (login
and password: basic authentication; extra ``headers``: sent with every request)."""

from __future__ import annotations

import base64
from typing import Any

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


def get_fs(conn_id: str | None, storage_options: dict[str, Any] | None = None):
    from fsspec.implementations.http import HTTPFileSystem

    options = dict(storage_options or {})
    if headers := request_headers(conn_id):
        client = dict(options.get("client_kwargs") or {})
        client["headers"] = {**headers, **client.get("headers", {})}
        options["client_kwargs"] = client
    return HTTPFileSystem(**options)
