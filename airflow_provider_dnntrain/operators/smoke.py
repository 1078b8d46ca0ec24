"""The check a new version passes before an endpoint's traffic moves to it: its own scoring server,
reached alone with the endpoint's key, answers the smoke rows as ``mlflow.pyfunc`` does in this task."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.backends.common.model_server import key_hash
from airflow_provider_dnntrain.backends.serving import ServingFailed

__all__ = ["check", "key_hash"]


def check(model_dir: Path, key: str | None, smoke_test: Any) -> Callable[[str], None]:
    """The check of a version served at a base URL: ``smoke_test`` rows (default: the version's input
    example) compared, or a callable ``(base_url, headers)`` that raises when the version is wrong."""
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    if callable(smoke_test):
        return lambda base: _users_check(smoke_test, base, headers)
    return lambda base: _compared(model_dir, smoke_test, base, headers)


def _users_check(smoke_test: Callable[[str, dict], None], base: str, headers: dict) -> None:
    try:
        smoke_test(base, dict(headers))
    except Exception as error:
        raise ServingFailed(f"smoke test: {type(error).__name__}: {error}") from error


def _compared(model_dir: Path, rows: Any, base: str, headers: dict) -> None:
    import mlflow
    import numpy as np

    model = mlflow.pyfunc.load_model(str(model_dir))
    rows = np.asarray(model.input_example if rows is None else rows, dtype=np.float32)
    try:
        expected = np.asarray(model.predict(rows))
    except Exception as error:
        raise ServingFailed(f"smoke test: the rows do not suit the model here either: {error}") from error
    status, answer = post(f"{base}/invocations", {"inputs": rows.tolist()}, headers)
    if status != 200:
        raise ServingFailed(f"smoke test: the new version answered {status}: {str(answer)[:1000]}")
    got = np.asarray(answer.get("predictions"))
    if got.shape != expected.shape or not np.allclose(got, expected, rtol=1e-4, atol=1e-5):
        raise ServingFailed(
            f"smoke test: the new version predicted {got.tolist()[:3]}..., "
            f"this task {expected.tolist()[:3]}..."
        )


def post(url: str, body: dict, headers: dict, timeout: float = 60) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as error:
        text = error.read().decode(errors="replace")
        return error.code, text
    except OSError as error:
        return 0, str(error)
