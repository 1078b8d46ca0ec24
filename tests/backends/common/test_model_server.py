"""One version served (backends/common/model_server.py): MLflow's scoring protocol through a real
server process, in every request format, and nothing but the probes without the endpoint's key."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from airflow_provider_dnntrain.backends.common import model_server
from airflow_provider_dnntrain.models.packaging import find_model, package

KEY = "k3y-of-the-endpoint"


def scaled():
    """Each row's sum, doubled: every prediction is known."""
    import torch

    class Scaled(torch.nn.Module):
        def forward(self, rows):
            return rows.sum(dim=1, keepdim=True) * 2.0

    return torch.jit.script(Scaled())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A TorchScript model (each row's sum, doubled), packaged as registration does, served."""
    folder = tmp_path_factory.mktemp("served")
    saved = folder / "model"
    saved.mkdir()
    scaled().save(saved / "model.pt")
    (saved / "input_example.json").write_text(json.dumps([[1.0, 2.0, 3.0]]))
    package(saved, folder / "pyfunc", find_model(saved))
    listener = socket.create_server(("127.0.0.1", 0))
    env = {**os.environ, model_server.KEY_HASH_VAR: model_server.key_hash(KEY)}
    server = subprocess.Popen(
        [sys.executable, model_server.__file__, str(folder / "pyfunc"), str(listener.fileno())],
        pass_fds=(listener.fileno(),),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 120
        while call(f"{base}/ping")[0] != 200:
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()
            time.sleep(0.2)
        yield base, server
    finally:
        server.terminate()
        server.wait(timeout=30)
        listener.close()


def call(url: str, body: dict | None = None, key: str | None = None) -> tuple[int, dict | str]:
    request = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None)
    request.add_header("Content-Type", "application/json")
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            text = response.read().decode()
            return response.status, json.loads(text) if text.startswith("{") else text
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except OSError:
        return 0, ""


@pytest.mark.parametrize(
    "body",
    [
        {"dataframe_split": {"columns": ["a", "b", "c"], "data": [[1, 2, 3], [4, 0, 0]]}},
        {"instances": [[1, 2, 3], [4, 0, 0]]},
        {"inputs": [[1, 2, 3], [4, 0, 0]]},
    ],
    ids=["dataframe_split", "instances", "inputs"],
)
def test_every_request_format_is_answered_with_the_key(served, body):
    base, _ = served
    assert call(f"{base}/invocations", body, KEY) == (200, {"predictions": [[12.0], [8.0]]})


def test_without_the_key_only_the_probes_answer(served):
    base, server = served
    body = {"inputs": [[1, 2, 3]]}
    for key in (None, "wrong", KEY + "x", ""):
        status, answer = call(f"{base}/invocations", body, key)
        assert status == 401 and answer["error_code"] == "UNAUTHENTICATED"
    assert call(f"{base}/version")[0] == 401
    assert call(f"{base}/version", key=KEY)[0] == 200
    assert call(f"{base}/ping")[0] == 200 and call(f"{base}/health")[0] == 200
    with open(f"/proc/{server.pid}/environ", "rb") as environ:
        assert KEY.encode() not in environ.read()  # only a hash of the key ever reaches the process
