"""What a training job saved, made an MLflow pyfunc model: its format found (or named), loaded here,
run on its input example, and saved with that example, the signature the run gave and the
requirements it loaded with. The loader is :mod:`.dnntrain_pyfunc`, copied into the model."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from airflow_provider_dnntrain.models import dnntrain_pyfunc

FORMATS = ("auto", "keras", "savedmodel", "torchscript", "torch_export", "state_dict", "files")
EXAMPLE_FILE = "input_example.json"  # beside the model: a list of rows, or {"inputs": rows}
_SUFFIXES = {"keras": (".keras",), "torch_export": (".pt2",), "torch": (".pt", ".pth")}
_DISTRIBUTIONS = {  # what each format loads with, by the names pip knows (the first installed is kept)
    "keras": (("tensorflow-cpu", "tensorflow"), ("keras",)),
    "savedmodel": (("tensorflow-cpu", "tensorflow"),),
    "torchscript": (("torch",),),
    "torch_export": (("torch",),),
    "state_dict": (("torch",),),
}


@dataclass(frozen=True)
class SavedModel:
    """The model in a folder: its format, and its file (``.`` for a SavedModel folder)."""

    format: str
    file: str


def find_model(folder: Path, model_format: str = "auto") -> SavedModel:
    """The model ``folder`` holds, of ``model_format`` or the one format found; a clear error else."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    found = _candidates(folder, names)
    wanted = [kind for kind in found if model_format in ("auto", kind)]
    shown = ", ".join(names[:20]) or "nothing"
    if not wanted:
        kind = "model" if model_format == "auto" else f"{model_format} model"
        raise ValueError(
            f"model_path: {folder.name}/ holds no {kind} to load ({shown}); save a Keras model "
            "(.keras), a SavedModel, TorchScript (.pt), a torch.export program (.pt2), or a state "
            "dict with model_class=, or register the files as they are with model_format='files'"
        )
    if len(wanted) > 1 or len(found[wanted[0]]) > 1:
        many = ", ".join(f"{kind}: {' '.join(found[kind])}" for kind in wanted)
        raise ValueError(
            f"model_path: {folder.name}/ holds more than one model ({many}); name its format with "
            "model_format=, or point model_path at its file"
        )
    return SavedModel(wanted[0], found[wanted[0]][0])


def _candidates(folder: Path, names: list[str]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    if (folder / "saved_model.pb").is_file():
        found["savedmodel"] = ["."]
    for name in names:
        suffix = Path(name).suffix
        kind = next((k for k, suffixes in _SUFFIXES.items() if suffix in suffixes), None)
        if kind == "torch":
            kind = "torchscript" if _is_torchscript(folder / name) else "state_dict"
        if kind is not None and not name.startswith("."):
            found.setdefault(kind, []).append(name)
    return found


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold their code; ``torch.save`` archives only data."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist())
    except zipfile.BadZipFile:
        return False


def package(
    folder: Path,
    into: Path,
    model: SavedModel,
    *,
    input_example: Any = None,
    model_class: str | None = None,
    framework_version: str | None = None,
) -> list[str]:
    """Save ``folder``'s model as a pyfunc model at ``into``; return its pinned requirements."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="dnntrain-model-") as staging:
        data = Path(staging) / "model"
        shutil.copytree(folder, data)
        config = {"format": model.format, "file": model.file}
        code = [dnntrain_pyfunc.__file__]
        if model.format == "state_dict":
            code.append(_state_dict_module(config, model_class))
        (data / dnntrain_pyfunc.CONFIG).write_text(json.dumps(config))
        example = _example(folder, input_example)
        with _importable(code[1:]):
            outputs = _predict(data, model.format, example)
        requirements = _requirements(model.format, framework_version)
        mlflow.pyfunc.save_model(
            str(into),
            loader_module="dnntrain_pyfunc",
            data_path=str(data),
            code_paths=code,
            signature=mlflow.models.infer_signature(example, outputs),
            input_example=example,
            pip_requirements=requirements,
        )
    return requirements


def _predict(data: Path, model_format: str, example):
    """The model loaded as a server will load it, on its example: what it answers, or a clear error."""
    try:
        return dnntrain_pyfunc._load_pyfunc(str(data)).predict(example)
    except Exception as error:
        raise ValueError(
            f"the {model_format} model did not load and predict its input example: "
            f"{type(error).__name__}: {error}"
        ) from error


@contextlib.contextmanager
def _importable(modules: list[str]):
    """A state dict's module importable by its name while the model is tried here."""
    folders = [str(Path(module).parent) for module in modules]
    sys.path[:0] = folders
    try:
        yield
    finally:
        for folder in folders:
            sys.path.remove(folder)


def _state_dict_module(config: dict, model_class: str | None) -> str:
    """``model_class`` is ``path/to/module.py:Class`` (a class built with no arguments)."""
    path, _, name = (model_class or "").rpartition(":")
    if not (path.endswith(".py") and name and Path(path).is_file()):
        raise ValueError(
            "model_class: a state dict needs the module that rebuilds it, as 'path/to/module.py:Class' "
            f"(a file on this worker, a class made with no arguments); got {model_class!r}"
        )
    config.update({"module": Path(path).stem, "class": name})
    return str(Path(path).resolve())


def _example(folder: Path, given: Any) -> Any:
    """The input example: given, else ``input_example.json`` beside the model."""
    import numpy as np

    if given is None and (folder / EXAMPLE_FILE).is_file():
        given = json.loads((folder / EXAMPLE_FILE).read_text())
    if isinstance(given, dict):
        given = given.get("inputs", given.get("instances", given))
    if given is None:
        raise ValueError(
            f"input_example: none given, and the model's folder has no {EXAMPLE_FILE}; write a few "
            "rows of input there from the training script, or pass input_example= (a list of rows)"
        )
    return np.asarray(given, dtype=np.float32)


def _requirements(model_format: str, framework_version: str | None) -> list[str]:
    """The distributions the model loaded with here, pinned; ``framework_version`` pins the first."""
    pinned = []
    for index, names in enumerate(_DISTRIBUTIONS[model_format]):
        for name in names:
            try:
                version = importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                continue
            pinned.append(f"{name}=={framework_version if index == 0 and framework_version else version}")
            break
    return pinned
