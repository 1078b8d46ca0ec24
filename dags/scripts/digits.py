"""Shared bits of the example training scripts: offline data, output folder, metric logging."""

from __future__ import annotations

import argparse
import functools
import json
import os
import threading
import time
from pathlib import Path

import numpy as np


def parse_training_args(lr: float, batch_size: int) -> argparse.Namespace:
    """The examples' command line: --epochs, --lr, --batch-size (defaults differ per script)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--batch-size", type=int, default=batch_size)
    return parser.parse_args()


def keras_mlp():
    """The TensorFlow examples' model: 64 inputs, one hidden layer, 10 logits."""
    import tensorflow as tf

    return tf.keras.Sequential(
        [tf.keras.Input((64,)), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(10)]
    )


def load_digits_split(seed: int = 0):
    """scikit-learn's 8x8 digits (inside the wheel, no download), scaled to [0, 1], 80/20 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype("float32")
    y = data.target.astype("int64")
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    cut = int(0.8 * len(x))
    return (x[:cut], y[:cut]), (x[cut:], y[cut:])


def output_dir() -> Path:
    path = Path(os.environ.get("DNNTRAIN_OUTPUT_DIR", "outputs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_dir() -> Path:
    """``outputs/model``: what the DAGs' RegisterModelOperator registers."""
    path = output_dir() / "model"
    path.mkdir(exist_ok=True)
    return path


def save_input_example(rows) -> None:
    """``outputs/model/input_example.json``: a few rows the registered model is checked and served
    with (RegisterModelOperator makes it the model's input example)."""
    (model_dir() / "input_example.json").write_text(json.dumps(np.asarray(rows).tolist()))


def resume_folder() -> Path | None:
    """An earlier run's outputs to continue from (``DNNTRAIN_RESUME_FROM``: the task's ``resume_from``,
    or on a retry the previous try's), if there are any."""
    folder = os.environ.get("DNNTRAIN_RESUME_FROM")
    return Path(folder) if folder and Path(folder).is_dir() else None


def launcher_rank() -> str | None:
    """The rank as the launcher numbered it: mpirun's, else horovodrun's (Gloo)."""
    return os.environ.get("OMPI_COMM_WORLD_RANK", os.environ.get("HOROVOD_RANK"))


_client_lock = threading.Lock()


def _mlflow_client():
    with _client_lock:
        return _cached_client()


@functools.cache
def _cached_client():
    from mlflow import MlflowClient

    return MlflowClient(os.environ.get("MLFLOW_TRACKING_URI"))


def warm_up_tracking() -> None:
    """Connect to the tracking store in the background, so the first metric does not stall training."""
    if os.environ.get("MLFLOW_RUN_ID"):
        threading.Thread(target=_mlflow_client, daemon=True).start()


def log_metrics(metrics: dict[str, float], step: int) -> None:
    """Log to the job's MLflow run when the launcher provided one (rank 0 only, by convention)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow.entities import Metric

    timestamp = int(time.time() * 1000)
    batch = [Metric(key, float(value), timestamp, step) for key, value in metrics.items()]
    _mlflow_client().log_batch(run_id, metrics=batch)


def write_summary(summary: dict) -> None:
    (output_dir() / "summary.json").write_text(json.dumps(summary, indent=2))
