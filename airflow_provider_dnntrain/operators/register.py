"""Register a training run's model as a new version in the MLflow model registry: a model that loads
with ``mlflow.pyfunc`` and serves, not only its files."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.models.packaging import FORMATS
from airflow_provider_dnntrain.spec import ResourceConfiguration

MODELS_ALIAS = "dnntrain-models"  # the alias a register task emits model://<name> through


def model_asset(name: str) -> Asset:
    """The Asset a model's new versions are events of: schedule a DAG on ``model_asset("digits")``."""
    return Asset(f"model://{name}")


class RegisterModelOperator(BaseOperator):
    """Register ``outputs/<model_path>`` of run ``run_id`` as a new version of ``model_name``.

    ``run_id`` is a training run id, or the training task's whole XCom (``train.output``). The model
    saved there - a Keras model (``.keras``), a SavedModel, TorchScript (``.pt``), a ``torch.export``
    program (``.pt2``), or a state dict with ``model_class="path/module.py:Class"`` - is found
    (``model_format="auto"``) or named, loaded here, run on its input example (``input_example=``, or
    ``input_example.json`` beside it) and registered as an MLflow pyfunc model with that example, the
    signature it answered with and the framework it loaded with, pinned. ``model_format="files"``
    registers the files as they are. Azure ML's ``model_framework``, ``model_framework_version`` and
    ``resource_configuration`` are kept on the version (the last one is its deployments' default).

    Returns the version number; registering the same run again returns the same version. Each
    registration is an event of the Asset ``model://<model_name>`` (extra: version, run ids, metrics).
    """

    template_fields: Sequence[str] = (
        "run_id",
        "model_name",
        "model_path",
        "tags",
        "tracking_uri",
        "model_format",
        "input_example",
        "model_class",
        "model_framework",
        "model_framework_version",
    )
    ui_color = "#d5f5e3"

    def __init__(
        self,
        *,
        run_id: Any,
        model_name: str,
        model_path: str = "model",
        tags: Mapping[str, str] | None = None,
        tracking_uri: str | None = None,
        tracking_conn_id: str | None = tracking.DEFAULT_CONN_ID,
        model_format: str = "auto",
        input_example: Any = None,
        model_class: str | None = None,
        model_framework: str | None = None,
        model_framework_version: str | None = None,
        resource_configuration: ResourceConfiguration | Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs["outlets"] = [*kwargs.get("outlets", []), _outlet(model_name)]
        super().__init__(**kwargs)
        self.run_id = run_id
        self.model_name = model_name
        self.model_path = model_path
        self.tags = dict(tags or {})
        self.tracking_uri = tracking_uri
        self.tracking_conn_id = tracking_conn_id
        self.model_format = _checked_format(model_format)
        self.input_example = input_example
        self.model_class = model_class
        self.model_framework = model_framework
        self.model_framework_version = model_framework_version
        self.resource_configuration = None
        if resource_configuration is not None:
            self.resource_configuration = ResourceConfiguration.model_validate(resource_configuration)

    def execute(self, context) -> int:
        from airflow_provider_dnntrain.models.registration import Packaging, register

        run_id = self.run_id["run_id"] if isinstance(self.run_id, Mapping) else str(self.run_id)
        uri = tracking.resolve_tracking_uri(self.tracking_uri, self.tracking_conn_id)
        _checked_format(self.model_format)
        packing = None
        if self.model_format != "files":
            packing = Packaging(
                model_format=self.model_format,
                input_example=self.input_example,
                model_class=self.model_class,
                framework_version=self.model_framework_version,
            )
        registered = register(uri, run_id, self.model_name, self.model_path, self._version_tags(), packing)
        version = registered["version"]
        self.log.info(
            "Registered model %s version %s from run %s (%s; loads with %s)",
            self.model_name,
            version,
            run_id,
            registered["tags"].get("model_format", "files"),
            registered["tags"].get("requirements") or "its files",
        )
        self._emit(context, registered)
        return version

    def _version_tags(self) -> dict[str, str]:
        named = {"framework": self.model_framework, "framework_version": self.model_framework_version}
        if self.resource_configuration is not None:  # kept whatever the format: deployments read it
            named["resource_configuration"] = self.resource_configuration.model_dump_json(exclude_none=True)
        return {**{k: v for k, v in named.items() if v}, **self.tags}

    def _emit(self, context, registered: dict[str, Any]) -> None:
        extra = {k: registered[k] for k in ("version", "run_id", "tracking_run_id", "model_uri", "metrics")}
        asset = model_asset(self.model_name)
        events = context["outlet_events"]
        if asset in self.outlets:
            events[asset].extra = extra
        else:
            events[AssetAlias(MODELS_ALIAS)].add(asset, extra=extra)


def _outlet(model_name: str) -> Asset | AssetAlias:
    """The model's Asset when its name is known at parse time, else the alias it is emitted through."""
    return AssetAlias(MODELS_ALIAS) if "{{" in model_name or "{%" in model_name else model_asset(model_name)


def _checked_format(model_format: str) -> str:
    if "{{" not in model_format and model_format not in FORMATS:
        raise ValueError(f"model_format: {model_format!r} is not one of {', '.join(FORMATS)}")
    return model_format
