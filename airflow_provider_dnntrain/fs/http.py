"""``http://`` and ``https://`` for Airflow's ObjectStoragePath (no provider registers them), so an input
can be downloaded from a web server: fsspec's HTTP filesystem, with the connection's credentials (login
and password: basic authentication; extra ``headers``: sent with every request)."""

from __future__ import annotations

from typing import Any

schemes = ["http", "https"]


def get_fs(conn_id: str | None, storage_options: dict[str, Any] | None = None):
    from fsspec.implementations.http import HTTPFileSystem

    options = dict(storage_options or {})
    if conn_id:
        import aiohttp
        from airflow.sdk import BaseHook

        connection = BaseHook.get_connection(conn_id)
        client = dict(options.get("client_kwargs") or {})
        headers = {**connection.extra_dejson.get("headers", {}), **client.get("headers", {})}
        if headers:
            client["headers"] = headers
        if connection.login:
            client["auth"] = aiohttp.BasicAuth(connection.login, connection.password or "")
        options["client_kwargs"] = client
    return HTTPFileSystem(**options)
