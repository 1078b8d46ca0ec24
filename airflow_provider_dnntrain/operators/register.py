"""Register a training run's model as a new version in the MLflow model registry."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from airflow.sdk import BaseOperator

from airflow_provider_dnntrain import tracking


class RegisterModelOperator(BaseOperator):
    """Register ``outputs/<model_path>`` of run ``run_id`` as a new version of ``model_name``.

    ``run_id`` is a training run id, or the training task's whole XCom (``train.output``).
    Framework and framework version come from the training run; ``tags`` are added to them.
    Returns the version number; registering the same run again returns the same version.
    """

    template_fields: Sequence[str] = ("run_id", "model_name", "model_path", "tags", "tracking_uri")
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
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.run_id = run_id
        self.model_name = model_name
        self.model_path = model_path
        self.tags = dict(tags or {})
        self.tracking_uri = tracking_uri
        self.tracking_conn_id = tracking_conn_id

    def execute(self, context) -> int:
        run_id = self.run_id["run_id"] if isinstance(self.run_id, Mapping) else str(self.run_id)
        uri = tracking.resolve_tracking_uri(self.tracking_uri, self.tracking_conn_id)
        version = tracking.register_model(uri, run_id, self.model_name, self.model_path, self.tags)
        self.log.info("Registered model %s version %s from run %s", self.model_name, version, run_id)
        return version
