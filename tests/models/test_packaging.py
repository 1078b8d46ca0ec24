"""A trained model made an MLflow pyfunc model (models/packaging.py): every format a training script
saves loads back through ``mlflow.pyfunc`` - with no code of this package on the path - and predicts
what the framework itself predicts; what cannot be loaded is refused with the reason."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from airflow_provider_dnntrain.models.packaging import find_model, package

ROWS = np.random.default_rng(0).random((4, 8), dtype=np.float32)
NET = """
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(8, 3)

    def forward(self, rows):
        return self.layer(rows)
"""


def torch_net(folder):
    (folder / "net.py").write_text(NET)
    sys.path.insert(0, str(folder))
    try:
        import net

        torch_seed()
        return net.Net().eval()
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("net", None)


def torch_seed():
    import torch

    torch.manual_seed(0)


def save_torchscript(folder, code):
    import torch

    model = torch_net(code)
    torch.jit.script(model).save(folder / "model.pt")
    return model(torch.from_numpy(ROWS)).detach().numpy()


def save_torch_export(folder, code):
    import torch

    model = torch_net(code)
    batch = {"rows": {0: torch.export.Dim("batch")}}  # any number of rows, as a server gets them
    program = torch.export.export(model, (torch.from_numpy(ROWS),), dynamic_shapes=batch)
    torch.export.save(program, folder / "model.pt2")
    return model(torch.from_numpy(ROWS)).detach().numpy()


def save_state_dict(folder, code):
    import torch

    model = torch_net(code)
    torch.save(model.state_dict(), folder / "state_dict.pt")
    return model(torch.from_numpy(ROWS)).detach().numpy()


def keras_model():
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(3)])


def save_keras(folder, code):
    model = keras_model()
    model.save(folder / "model.keras")
    return np.asarray(model(ROWS))


def save_savedmodel(folder, code):
    model = keras_model()
    model.export(str(folder))  # a SavedModel folder: saved_model.pb, variables/
    return np.asarray(model(ROWS))


SAVERS = {
    "torchscript": save_torchscript,
    "torch_export": save_torch_export,
    "state_dict": save_state_dict,
    "keras": save_keras,
    "savedmodel": save_savedmodel,
}


@pytest.mark.parametrize("model_format", list(SAVERS))
def test_each_format_loads_through_mlflow_alone_and_predicts_as_the_framework_does(tmp_path, model_format):
    saved, code = tmp_path / "model", tmp_path / "code"
    saved.mkdir(), code.mkdir()
    expected = SAVERS[model_format](saved, code)
    (saved / "input_example.json").write_text(json.dumps(ROWS[:2].tolist()))
    model = find_model(saved)
    assert model.format == model_format
    model_class = f"{code / 'net.py'}:Net" if model_format == "state_dict" else None
    requirements = package(saved, tmp_path / "pyfunc", model, model_class=model_class)
    framework = "torch" if "torch" in model_format or model_format == "state_dict" else "tensorflow-cpu"
    assert any(r.startswith(f"{framework}==") for r in requirements)
    assert (tmp_path / "pyfunc" / "serving_input_example.json").is_file()
    # A fresh interpreter, isolated from this package and the test's folders: only what the model holds.
    probe = textwrap.dedent(
        f"""
        import json, sys, numpy as np, mlflow.pyfunc
        assert not any(name.startswith("airflow_provider_dnntrain") for name in sys.modules)
        model = mlflow.pyfunc.load_model({str(tmp_path / "pyfunc")!r})
        print(json.dumps(model.predict(np.array({ROWS.tolist()}, dtype=np.float32)).tolist()))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    np.testing.assert_allclose(json.loads(done.stdout.strip().splitlines()[-1]), expected, rtol=1e-5)


def test_what_cannot_be_registered_as_a_model_is_refused_naming_the_fix(tmp_path):
    saved = tmp_path / "model"
    saved.mkdir()
    (saved / "weights.npz").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"model_path: model/ holds no model to load \(weights.npz\)"):
        find_model(saved)
    with pytest.raises(ValueError, match="no keras model"):
        find_model(saved, "keras")

    save_keras(saved, None)
    save_torchscript(saved, tmp_path)
    with pytest.raises(
        ValueError, match=r"more than one model \(keras: model.keras, torchscript: model.pt\)"
    ):
        find_model(saved)
    assert find_model(saved, "torchscript").file == "model.pt"  # named: the other is left alone

    with pytest.raises(ValueError, match="input_example: none given"):
        package(saved, tmp_path / "no-example", find_model(saved, "keras"))
    assert not (tmp_path / "no-example").exists()


def test_a_state_dict_needs_its_module_and_a_model_that_cannot_predict_is_not_registered(tmp_path):
    saved = tmp_path / "model"
    saved.mkdir()
    save_state_dict(saved, tmp_path)
    model = find_model(saved)
    with pytest.raises(ValueError, match="model_class: a state dict needs the module"):
        package(saved, tmp_path / "a", model, input_example=ROWS.tolist())
    wrong_width = np.ones((2, 5)).tolist()  # the net takes 8 columns
    with pytest.raises(ValueError, match="the state_dict model did not load and predict its input example"):
        package(saved, tmp_path / "b", model, input_example=wrong_width, model_class=f"{tmp_path}/net.py:Net")
