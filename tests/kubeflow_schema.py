"""Checks a TFJob / PyTorchJob / MPIJob against the Kubeflow training operator's API, as its SDK's models
(made from the CRDs' OpenAPI schemas) describe it: every field known and of its type, required fields
there; each replica's pod template checked by kubernetes-validate (strict) as the PodTemplateSpec it is.
The models are installed by ``scripts/install-kubeflow-models.sh`` into ``.venv/kubeflow-models``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import kubernetes_validate

KUBERNETES_VERSION = "1.37.0"
MODELS = Path(__file__).resolve().parents[1] / ".venv" / "kubeflow-models"
_REQUIRED = {  # required by the CRDs (their openAPIV3Schema), below the job's spec
    "KubeflowOrgV1TFJobSpec": ("tf_replica_specs",),
    "KubeflowOrgV1PyTorchJobSpec": ("pytorch_replica_specs",),
    "KubeflowOrgV1MPIJobSpec": ("mpi_replica_specs",),
}


class KubeflowSchemaError(ValueError):
    pass


def _models():
    if str(MODELS) not in sys.path:
        sys.path.insert(0, str(MODELS))
    import kubeflow.training.models as models

    return models


def validate_kubeflow(obj: dict) -> None:
    """Raise :class:`KubeflowSchemaError` naming the first field that the API would refuse."""
    models = _models()
    if obj.get("apiVersion") != "kubeflow.org/v1":
        raise KubeflowSchemaError(f"apiVersion: {obj.get('apiVersion')!r} is not kubeflow.org/v1")
    model = getattr(models, f"KubeflowOrgV1{obj.get('kind', '')}", None)
    if model is None:
        raise KubeflowSchemaError(f"kind: {obj.get('kind')!r} is not a Kubeflow training job")
    check_model(obj, model.__name__, "", models, _REQUIRED)


def check_model(value, type_name: str, path: str, models, required: dict, error=None) -> None:
    """``value`` as the SDK model ``type_name`` of ``models`` describes it (``required``: fields by
    model name); ``error``: the exception class to raise (default KubeflowSchemaError)."""
    error = error or KubeflowSchemaError
    _check(value, type_name, path, models, required, error)


def _check(value, type_name: str, path: str, models, required: dict, error) -> None:  # noqa: C901
    scalar = {"str": str, "int": int, "bool": bool, "float": (int, float), "object": object}
    if type_name in scalar:
        if not isinstance(value, scalar[type_name]) or (type_name == "int" and isinstance(value, bool)):
            raise error(f"{path}: {value!r} is not {type_name}")
        return
    if type_name == "Quantity":
        if not isinstance(value, (str, int, float)):
            raise error(f"{path}: {value!r} is not a quantity")
        return
    if match := re.fullmatch(r"list\[(.+)\]", type_name):
        if not isinstance(value, list):
            raise error(f"{path}: not a list")
        for i, item in enumerate(value):
            _check(item, match.group(1), f"{path}[{i}]", models, required, error)
        return
    if match := re.fullmatch(r"dict[(\[]str, (.+)[)\]]", type_name):
        if not isinstance(value, dict):
            raise error(f"{path}: not a map")
        for key, item in value.items():
            _check(item, match.group(1), f"{path}.{key}", models, required, error)
        return
    if type_name == "V1PodTemplateSpec":
        _check_pod_template(value, path, error)
        return
    model = getattr(models, type_name, None)
    if model is None:  # a core type (V1ObjectMeta...): its own model from the kubernetes client
        import kubernetes.client

        model = getattr(kubernetes.client, type_name)
    if not isinstance(value, dict):
        raise error(f"{path}: not an object ({type_name})")
    by_json = {json_name: attr for attr, json_name in model.attribute_map.items()}
    for key, item in value.items():
        if key not in by_json:
            raise error(f"{path}.{key}: unknown field of {type_name}")
        _check(item, model.openapi_types[by_json[key]], f"{path}.{key}".lstrip("."), models, required, error)
    for attr in required.get(type_name, ()):
        if model.attribute_map[attr] not in value:
            raise error(f"{path}.{model.attribute_map[attr]}: required")


def _check_pod_template(value: dict, path: str, error) -> None:
    template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": value}
    try:
        kubernetes_validate.validate(template, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as failure:
        where = ".".join(str(p) for p in list(failure.path)[1:])
        raise error(f"{path}.{where}: {str(failure).splitlines()[0]}") from None
