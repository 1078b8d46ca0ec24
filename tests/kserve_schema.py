"""Checks an InferenceService against KServe's API, as its SDK's models describe it: every field known
and of its type, the required ones there. The SDK is installed by ``scripts/install-kserve-models.sh``
into ``.venv/kserve-models``; its models are loaded without the SDK's package ``__init__`` (which
starts on KServe's model server and its dependencies)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

from kubeflow_schema import check_model

MODELS = Path(__file__).resolve().parents[1] / ".venv" / "kserve-models"
_REQUIRED = {
    "V1beta1InferenceServiceSpec": ("predictor",),
    "V1beta1ModelSpec": ("model_format",),
    "V1beta1ModelFormat": ("name",),
}


class KServeSchemaError(ValueError):
    pass


def _models():
    if "kserve" not in sys.modules:
        package = types.ModuleType("kserve")
        package.__path__ = [str(MODELS / "kserve")]
        sys.modules["kserve"] = package
    import kserve.models as models

    return models


def validate_inference_service(obj: dict) -> None:
    """Raise :class:`KServeSchemaError` naming the first field KServe's API would refuse."""
    models = _models()
    if obj.get("apiVersion") != "serving.kserve.io/v1beta1" or obj.get("kind") != "InferenceService":
        raise KServeSchemaError(f"{obj.get('apiVersion')}/{obj.get('kind')} is not an InferenceService")
    check_model(obj, "V1beta1InferenceService", "", models, _REQUIRED, KServeSchemaError)
