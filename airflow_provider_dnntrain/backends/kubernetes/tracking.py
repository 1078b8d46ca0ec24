"""The embedded tracking store, served to a run's pods: pods cannot reach the worker's SQLite file nor
its loopback, so an MLflow server this task runs serves the store on an address of the worker the
pods reach (given, or this worker's address on the route to the API server)."""

from __future__ import annotations

import socket
from pathlib import Path
from urllib.parse import urlsplit

from airflow_provider_dnntrain.backends.common.tracking_server import StoreServer, needs_relay


def serve_store(
    tracking_uri: str, run_dir: Path, run_id: str, address: str | None, bind: str, api_server: str
):
    """The server for the pods and the URI they use.
    ``address``: ``host:port`` where pods reach this worker (port 0: a free one); ``api_server``: the
    cluster's API server URL, whose route gives this worker's address when none is given."""
    log_file = run_dir.with_suffix(".tracking-server.log")
    if urlsplit(tracking_uri).scheme.startswith("http"):
        raise ValueError(
            f"tracking_uri: {tracking_uri} listens on this worker's loopback, which pods cannot reach; "
            "let it listen on an address they reach, and name that one"
        )
    host, _, port = (address or f"{address_towards(api_server)}:0").rpartition(":")
    server = StoreServer(tracking_uri, log_file, run_id, listen=(bind, int(port)))
    server.start(run_exists=False)  # boots while the pods start, if the store is set up
    return server, f"http://{host}:{server.target[1]}"


def serve_store_again(tracking_uri: str | None, run, bind: str) -> StoreServer | None:
    """For a run taken over: the embedded store served again where its pods reach it (``None``: the
    run's pods reach their store themselves)."""
    if not (run.relay_port and tracking_uri and needs_relay(tracking_uri)):
        return None
    log_file = run.run_dir.with_suffix(".tracking-server.log")
    server = StoreServer(tracking_uri, log_file, run.run_id, (bind, run.relay_port))
    server.start(run_exists=False)
    return server


def address_towards(api_server: str) -> str:
    """This worker's address on the route to the API server: where pods usually reach it."""
    server = urlsplit(api_server)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((server.hostname, server.port or 443))
        address = probe.getsockname()[0]
    if address.startswith("127."):
        raise ValueError(
            "tracking: the job's tracking store is on this worker (the embedded store, or a server on "
            "its loopback) and the cluster's API server is reached over loopback, so no address of "
            "this worker is known to the pods; give tracking_uri=http://<server the pods reach>, or "
            "the launcher's tracking_address='<host>:<port>'"
        )
    return address
