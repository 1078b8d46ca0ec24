"""A web server a test starts on a folder: the object store inputs are downloaded from.

It answers like a store that versions its objects: an ``ETag`` (from the file's content), directory
index pages, basic authentication when given credentials; and it records every request, so a test can
tell a download (GET of a file) from a version check (HEAD).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import threading
import uuid
from functools import partial
from pathlib import Path


class ObjectStore:
    def __init__(
        self,
        root: Path,
        *,
        bind: str = "127.0.0.1",
        port: int = 0,
        credentials: tuple[str, str] | None = None,
    ):
        self.root = root
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self._lock = threading.Lock()
        handler = partial(_Handler, store=self, directory=str(root))
        self._server = http.server.ThreadingHTTPServer((bind, port), handler)
        self._server.daemon_threads = True
        self.credentials = credentials
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path}"

    def downloads(self, path: str) -> int:
        """How many times the file at ``path`` was read whole."""
        with self._lock:
            return sum(1 for method, seen in self.requests if method == "GET" and seen == f"/{path}")

    def record(self, method: str, path: str) -> None:
        with self._lock:
            self.requests.append((method, path))

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, store: ObjectStore, **kwargs) -> None:
        self.store = store
        super().__init__(*args, **kwargs)

    def log_message(self, format: str, *args) -> None:  # quiet
        return

    def _allowed(self) -> bool:
        if self.store.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.store.credentials).encode()).decode()
        if self.headers.get("Authorization") == f"Basic {expected}":
            return True
        self.send_response(401)
        self.send_header("WWW-Authenticate", 'Basic realm="store"')
        self.send_header("Content-Length", "0")
        self.end_headers()
        return False

    def do_GET(self) -> None:
        self.store.record("GET", self.path)
        if self._allowed():
            super().do_GET()

    def do_HEAD(self) -> None:
        self.store.record("HEAD", self.path)
        if self._allowed():
            super().do_HEAD()

    def end_headers(self) -> None:
        path = Path(self.translate_path(self.path))
        if path.is_file():
            self.send_header("ETag", '"' + hashlib.md5(path.read_bytes()).hexdigest() + '"')
        super().end_headers()


class S3Store:
    """An S3 server (moto's) a test starts, with a bucket of its own (moto's servers in one process share
    their objects), reached through an Airflow connection of the amazon provider's type, as a user's
    store would be."""

    def __init__(self, *, bind: str = "127.0.0.1", port: int = 0, address: str | None = None):
        import boto3
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=bind, port=port, verbose=False)
        self._server.start()
        self.endpoint = f"http://{address or bind}:{self._server.get_host_and_port()[1]}"
        self.bucket = f"datasets-{uuid.uuid4().hex[:8]}"
        self.client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="test-key",
            aws_secret_access_key="test-secret",
            region_name="us-east-1",
        )
        self.client.create_bucket(Bucket=self.bucket)

    def put(self, key: str, body: str) -> None:
        self.client.put_object(Bucket=self.bucket, Key=key, Body=body.encode())

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def connection(self, secret: str = "test-secret") -> str:
        """The connection's JSON (``AIRFLOW_CONN_<ID>``)."""
        import json

        extra = {"endpoint_url": self.endpoint, "region_name": "us-east-1"}
        return json.dumps({"conn_type": "aws", "login": "test-key", "password": secret, "extra": extra})

    def close(self) -> None:
        self._server.stop()
