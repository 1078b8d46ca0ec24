"""Stand-ins for the two images KServe's MLflow runtime runs in a predictor's pod:

- ``storage-initializer URI DIR``: KServe's storage initializer, for ``file://`` URIs and paths (which it
  copies); anything else fails as it would without credentials or network here;
- ``serve``: MLServer with its MLflow runtime (``MLSERVER_MODEL_NAME``, ``MLSERVER_MODEL_URI``,
  ``MLSERVER_HTTP_PORT``): the v2 protocol (``/v2/health/live``, ``/v2/health/ready``,
  ``/v2/models/<name>/ready``, ``POST /v2/models/<name>/infer``) and the runtime's MLflow endpoints
  (``GET /ping``, ``POST /invocations``). Ready once the model is loaded; no key.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


def storage_initializer(uri: str, into: str) -> None:
    parts = urlsplit(uri)
    if parts.scheme not in ("", "file"):
        sys.exit(f"storage-initializer: cannot fetch {uri} here")
    shutil.copytree(parts.path, into, dirs_exist_ok=True)
    print(f"Copied {uri} to {into}", flush=True)


def serve() -> None:
    import mlflow.pyfunc

    name = os.environ["MLSERVER_MODEL_NAME"]
    model = mlflow.pyfunc.load_model(os.environ["MLSERVER_MODEL_URI"])
    port = int(os.environ.get("MLSERVER_HTTP_PORT", "8080"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            ready = ("/v2/health/live", "/v2/health/ready", f"/v2/models/{name}/ready", "/ping")
            self.answer(200 if self.path in ready else 404, {})

        def do_POST(self) -> None:  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            try:
                if self.path == "/invocations":
                    self.answer(200, {"predictions": predicted(body)})
                elif self.path == f"/v2/models/{name}/infer":
                    self.answer(200, inferred(body))
                else:
                    self.answer(404, {"error": f"no route {self.path}"})
            except Exception as error:
                self.answer(400, {"error": f"{type(error).__name__}: {error}"})

        def answer(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    def predicted(body: dict) -> list:
        import numpy as np
        import pandas as pd

        if "dataframe_split" in body:
            rows = pd.DataFrame(**body["dataframe_split"])
        else:
            rows = np.asarray(body.get("inputs", body.get("instances")), dtype=np.float32)
        return np.asarray(model.predict(rows)).tolist()

    def inferred(body: dict) -> dict:
        import numpy as np

        (tensor,) = body["inputs"]
        rows = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
        out = np.asarray(model.predict(rows))
        output = {
            "name": "output-1",
            "shape": list(out.shape),
            "datatype": "FP32",
            "data": out.ravel().tolist(),
        }
        return {"model_name": name, "outputs": [output]}

    server = ThreadingHTTPServer(("", port), Handler)
    print(f"MLServer stand-in serving {name} on port {port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    if sys.argv[1] == "storage-initializer":
        storage_initializer(sys.argv[2], sys.argv[3])
    else:
        serve()
