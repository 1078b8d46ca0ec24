"""``azureml.core.Run`` for training scripts written for Azure ML (SDK v1), on the run's MLflow tracking.

Installed by sitecustomize.py when the job asks for it (``azureml_compat=True``): ``from azureml.core
import Run`` and ``from azureml.core.run import Run`` then work unchanged. ``Run.get_context()`` is the
job's tracking run; ``log``, ``log_list``, ``log_row``, ``log_table``, ``tag``, ``set_tags``,
``upload_file``, ``upload_folder`` and ``register_model`` map onto it. Only the primary process (global
rank 0, or the chief) logs: other ranks' calls do nothing, as their numbers are rank 0's. Without a
tracking run (no ``MLFLOW_RUN_ID``) it is an offline run that prints what it is given, as Azure's did.
The rest of the Azure SDK (Workspace, Dataset, Model...) is not here: importing it says so.

Standard library at import; MLflow only when a call needs it.
"""

from __future__ import annotations

import numbers
import os
import shutil
import sys
import tempfile
import types

_primary = False  # whether this process logs (set by install)


class _Experiment:
    def __init__(self, run: Run) -> None:
        self._run = run

    @property
    def name(self) -> str:
        if not self._run._online:
            return "offline"
        client = _client()
        return client.get_experiment(client.get_run(self._run.id).info.experiment_id).name


class Run:
    """The job's tracking run, as Azure ML's ``Run`` is used from a training script."""

    _context: Run | None = None

    def __init__(self, run_id: str | None, primary: bool) -> None:
        self.id = run_id or f"OfflineRun_{os.getpid()}"
        self._online = run_id is not None
        self._primary = primary
        self._rows: dict[str, int] = {}
        self._steps: dict[str, int] = {}
        self.experiment = _Experiment(self)
        self.display_name = os.environ.get("DNNTRAIN_RUN_ID", self.id)
        self.parent = None
        self.input_datasets = {
            name[len("DNNTRAIN_INPUT_") :].lower(): path
            for name, path in os.environ.items()
            if name.startswith("DNNTRAIN_INPUT_")
        }

    @classmethod
    def get_context(cls, allow_offline: bool = True, **_: object) -> Run:
        if cls._context is None:
            run_id = os.environ.get("MLFLOW_RUN_ID") or os.environ.get("DNNTRAIN_TRACKING_RUN_ID")
            if run_id is None and not allow_offline:
                raise RuntimeError("azureml compat: no tracking run (run the job with tracking=True)")
            cls._context = cls(run_id, _primary)
        return cls._context

    # -- metrics ----------------------------------------------------------------------------------

    def log(self, name: str, value, description: str = "", step: int | None = None) -> None:
        if callable(getattr(value, "item", None)):  # a NumPy scalar or a one-element tensor
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            self.tag(name, str(value))  # MLflow's metrics are numbers; Azure took any scalar
            return
        if step is None:  # Azure appended each value of a name to its series: steps 0, 1, 2...
            step = self._steps.get(name, 0)
        self._steps[name] = step + 1
        self._call("log_metric", name, float(value), step=step)

    def log_list(self, name: str, value, description: str = "") -> None:
        for step, item in enumerate(value):
            self.log(name, item, step=step)

    def log_row(self, name: str, description: str | None = None, **kwargs) -> None:
        step = self._rows.get(name, 0)
        self._rows[name] = step + 1
        for column, value in kwargs.items():
            self.log(f"{name}.{column}", value, step=step)

    def log_table(self, name: str, value: dict, description: str = "") -> None:
        for column, values in value.items():
            for step, item in enumerate(values):
                self.log(f"{name}.{column}", item, step=step)

    # -- tags and files ---------------------------------------------------------------------------

    def tag(self, key: str, value: str | None = None) -> None:
        self._call("set_tag", key, "" if value is None else str(value))

    def set_tags(self, tags: dict) -> None:
        for key, value in tags.items():
            self.tag(key, value)

    def upload_file(self, name: str, path_or_stream) -> None:
        """The file (a path or a binary stream) at ``name`` among the run's artifacts."""
        folder, filename = os.path.split(name.strip("/"))
        with tempfile.TemporaryDirectory() as scratch:
            copy = os.path.join(scratch, filename)
            if isinstance(path_or_stream, (str, os.PathLike)):
                shutil.copyfile(path_or_stream, copy)
            else:
                with open(copy, "wb") as out:
                    shutil.copyfileobj(path_or_stream, out)
            self._call("log_artifact", copy, folder or None)

    def upload_folder(self, name: str, path: str) -> None:
        self._call("log_artifacts", path, name.strip("/") or None)

    # -- models -----------------------------------------------------------------------------------

    def register_model(
        self,
        model_name: str,
        model_path: str | None = None,
        tags: dict | None = None,
        properties: dict | None = None,
        description: str | None = None,
        **_: object,
    ):
        """A new version of ``model_name`` from ``model_path``: a path in the working directory (such as
        ``outputs/model.pkl``) is uploaded to the same path among the run's artifacts first."""
        model_path = (model_path or "outputs").strip("/")
        if not (self._online and self._primary):
            print(
                f"azureml compat: register_model({model_name!r}, {model_path!r}) skipped: "
                f"{'not the primary process' if self._online else 'offline run'}",
                flush=True,
            )
            return None
        from mlflow.exceptions import MlflowException

        client = _client()
        if os.path.isdir(model_path):
            client.log_artifacts(self.id, model_path, model_path)
        elif os.path.isfile(model_path):
            client.log_artifact(self.id, model_path, os.path.dirname(model_path) or None)
        try:
            client.create_registered_model(model_name)
        except MlflowException as error:
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        source = f"{client.get_run(self.id).info.artifact_uri}/{model_path}"
        all_tags = {**(properties or {}), **(tags or {})}
        return client.create_model_version(
            model_name,
            source,
            run_id=self.id,
            tags={k: str(v) for k, v in all_tags.items()},
            description=description,
        )

    # -- the rest of a run's life -----------------------------------------------------------------

    def get_metrics(self, name: str | None = None) -> dict:
        if not self._online:
            return {}
        metrics = _client().get_run(self.id).data.metrics
        return {k: v for k, v in metrics.items() if name is None or k == name}

    def get_tags(self) -> dict:
        if not self._online:
            return {}
        return dict(_client().get_run(self.id).data.tags)

    def get_status(self) -> str:
        return "Running"

    def complete(self, **_: object) -> None:
        """The launcher ends the run when the job ends (with its outputs uploaded)."""

    def flush(self, **_: object) -> None:
        """Every call is sent as it is made."""

    def _call(self, method: str, *args, **kwargs) -> None:
        if not self._primary:
            return  # other ranks' numbers are rank 0's
        if not self._online:
            print(f"Attempted to {method} {args!r} on an offline run", flush=True)
            return
        getattr(_client(), method)(self.id, *args, **kwargs)


def _client():
    import mlflow

    return mlflow.MlflowClient()


def _missing(module: str):
    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError(
            f"azureml compat: {module}.{name} is not provided; only azureml.core.Run is (the job's "
            "MLflow run). Read data through the job's inputs (Run.get_context().input_datasets, "
            "DNNTRAIN_INPUT_<NAME>) and register models with Run.register_model or RegisterModelOperator"
        )

    return __getattr__


def install(primary: bool) -> None:
    """Make ``azureml``, ``azureml.core`` and ``azureml.core.run`` importable, providing ``Run``;
    ``primary``: whether this process is the one that logs."""
    global _primary
    _primary = primary
    names = ("azureml", "azureml.core", "azureml.core.run")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__path__ = []  # packages, so that their submodules import
        module.__getattr__ = _missing(name)
        sys.modules[name] = module
    for name in ("azureml.core", "azureml.core.run"):
        modules[name].Run = Run
    modules["azureml"].core = modules["azureml.core"]
    modules["azureml.core"].run = modules["azureml.core.run"]
