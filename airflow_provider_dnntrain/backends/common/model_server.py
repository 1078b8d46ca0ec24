"""One version of a model served: MLflow's scoring server (``/invocations``, ``/ping``, ``/health``,
``/version``) on a socket handed over by its supervisor, behind the endpoint's key.

Every request needs ``Authorization: Bearer <key>`` but the probes (``GET /ping``, ``GET /health``,
which say nothing about the model): a Kubernetes probe or a load balancer cannot hold a secret. The
process gets the key's SHA-256 (``DNNTRAIN_ENDPOINT_KEY_SHA256``), never the key. Standard library at
module level: it runs by path in the model's own environment (MLflow, uvicorn and the framework).

Run: ``python model_server.py MODEL_DIR FD`` (a listening socket handed over), or ``MODEL_DIR
--port=PORT`` (its own, on every address: a pod's); ``python model_server.py fetch MODEL_URI DIR``
downloads a registered version (``models:/<name>/<version>``) from the registry ``MLFLOW_TRACKING_URI``
names into ``DIR`` (a pod's init container).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import sys

KEY_HASH_VAR = "DNNTRAIN_ENDPOINT_KEY_SHA256"
VERSION_VAR = "DNNTRAIN_MODEL_VERSION"  # sent back as the header X-Model-Version: which one answered
OPEN_PATHS = ("/ping", "/health")
_REFUSED = (
    b'{"error_code": "UNAUTHENTICATED", "message": "this endpoint needs its key: '
    b'send the header Authorization: Bearer <key>"}'
)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRequired:
    """ASGI middleware: a request without the endpoint's key is answered 401 and goes no further."""

    def __init__(self, app, expected_hash: str, version: str = "") -> None:
        self.app = app
        self.expected = expected_hash.encode()
        self.version = [(b"x-model-version", version.encode())] if version else []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._allowed(scope):
            headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
            await send({"type": "http.response.start", "status": 401, "headers": headers + self.version})
            await send({"type": "http.response.body", "body": _REFUSED})
            return None

        async def tagged(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.version]}
            await send(message)

        return await self.app(scope, receive, tagged)

    def _allowed(self, scope) -> bool:
        if scope["method"] == "GET" and scope["path"] in OPEN_PATHS:
            return True
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        digest = hashlib.sha256(token.strip()).hexdigest().encode()
        return scheme.lower() == b"bearer" and hmac.compare_digest(digest, self.expected)


def main(model_dir: str, listener: socket.socket) -> None:
    expected = os.environ.pop(KEY_HASH_VAR)  # not handed on to anything the model starts
    import uvicorn
    from mlflow.pyfunc import scoring_server

    app = scoring_server.init(scoring_server.load_model_with_mlflow_config(model_dir))
    served = KeyRequired(app, expected, os.environ.get(VERSION_VAR, ""))
    config = uvicorn.Config(served, workers=1, access_log=False)
    uvicorn.Server(config).run(sockets=[listener])


def fetch(model_uri: str, into: str) -> None:
    import tempfile

    import mlflow.artifacts

    parent = os.path.dirname(os.path.abspath(into))
    with tempfile.TemporaryDirectory(dir=parent) as work:
        os.rename(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=work), into)


def _listener(argument: str) -> socket.socket:
    if argument.startswith("--port="):
        return socket.create_server(("", int(argument.split("=", 1)[1])), backlog=1024)
    return socket.socket(fileno=int(argument))


if __name__ == "__main__":
    if sys.argv[1] == "fetch":
        fetch(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], _listener(sys.argv[2]))
