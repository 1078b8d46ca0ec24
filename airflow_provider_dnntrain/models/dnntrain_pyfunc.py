"""The ``loader_module`` of every model ``RegisterModelOperator`` registers: loads what a training job
saved as an MLflow pyfunc model. Copied into each model (``code/``), so it imports nothing of this
package - only NumPy and the model's framework - and loads wherever ``mlflow.pyfunc`` runs: a task,
``mlflow models serve``, a container, KServe's MLflow runtime.

Beside the saved model, ``dnntrain-model.json`` names its format and file (and, for a state dict, the
module and class that rebuild it: the module is copied into ``code/`` too).
"""

import importlib
import json
import os

import numpy as np

CONFIG = "dnntrain-model.json"


class TrainedModel:
    """A batch of rows in (a DataFrame, an array or nested lists), the model's outputs out."""

    def __init__(self, predict_batch):
        self._predict_batch = predict_batch

    def predict(self, model_input, params=None):
        if hasattr(model_input, "to_numpy"):
            model_input = model_input.to_numpy()
        return np.asarray(self._predict_batch(np.array(model_input, dtype=np.float32)))


def _load_pyfunc(data_path):
    with open(os.path.join(data_path, CONFIG)) as config_file:
        config = json.load(config_file)
    return TrainedModel(_LOADERS[config["format"]](os.path.join(data_path, config["file"]), config))


def _keras(path, config):
    import keras

    model = keras.saving.load_model(path, compile=False)
    return lambda rows: np.asarray(model(rows, training=False))


def _saved_model(path, config):
    import tensorflow as tf

    serve = tf.saved_model.load(path).signatures["serving_default"]
    (name,) = serve.structured_input_signature[1]
    return lambda rows: next(iter(serve(**{name: tf.constant(rows)}).values())).numpy()


def _torch_module(module, *, train_mode_switch=True):
    import torch

    if train_mode_switch:  # an exported program was exported in the mode it runs in
        module.eval()

    def predict(rows):
        with torch.no_grad():
            return module(torch.from_numpy(rows)).numpy()

    return predict


def _torchscript(path, config):
    import torch

    return _torch_module(torch.jit.load(path, map_location="cpu"))


def _torch_export(path, config):
    import torch

    return _torch_module(torch.export.load(path).module(), train_mode_switch=False)


def _state_dict(path, config):
    import torch

    module = getattr(importlib.import_module(config["module"]), config["class"])()
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return _torch_module(module)


_LOADERS = {
    "keras": _keras,
    "savedmodel": _saved_model,
    "torchscript": _torchscript,
    "torch_export": _torch_export,
    "state_dict": _state_dict,
}
