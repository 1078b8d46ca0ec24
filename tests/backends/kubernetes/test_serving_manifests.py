"""The Kubernetes serving objects as rendered (pure): KServe's InferenceService form checked against
KServe's SDK models; the Deployment's resources from the version's resource configuration. (The
Deployment, Service and Secret are checked by the fake cluster's admission, kubernetes-validate strict,
in test_serving.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
from kserve_schema import KServeSchemaError, validate_inference_service

from airflow_provider_dnntrain.backends.kubernetes import serving_manifests as manifests
from airflow_provider_dnntrain.backends.serving import ServedVersion

VERSION = ServedVersion(
    "digits",
    "3",
    Path("/nowhere"),
    framework="pytorch",
    resources={"cpu": 0.5, "memory_in_gb": 1.5, "gpu": 1},
)


def test_the_kserve_form_is_an_inference_service_kserve_accepts():
    resources = manifests.resources_of(VERSION, None)
    obj = manifests.inference_service(
        "digits", "serving", VERSION, storage_uri="s3://models/digits/3", resources=resources,
        canary_traffic_percent=10, service_account="models-reader",
    )  # fmt: skip
    validate_inference_service(obj)
    predictor = obj["spec"]["predictor"]
    assert predictor["model"]["modelFormat"] == {"name": "mlflow"}
    assert predictor["model"]["storageUri"] == "s3://models/digits/3"
    assert predictor["canaryTrafficPercent"] == 10
    assert predictor["model"]["resources"] == {
        "requests": {"cpu": "500m", "memory": "1536Mi"},
        "limits": {"memory": "1536Mi", "nvidia.com/gpu": "1"},
    }


def test_the_kserve_check_names_what_kserve_would_refuse():
    obj = manifests.inference_service("digits", "serving", VERSION, storage_uri="s3://m", resources={})
    obj["spec"]["predictor"]["canaryTrafficPercent"] = "ten"
    with pytest.raises(KServeSchemaError, match=r"spec.predictor.canaryTrafficPercent: 'ten' is not int"):
        validate_inference_service(obj)
    del obj["spec"]["predictor"]["canaryTrafficPercent"]
    obj["spec"]["predictor"]["model"]["modelFormats"] = obj["spec"]["predictor"]["model"].pop("modelFormat")
    with pytest.raises(KServeSchemaError, match=r"modelFormats: unknown field of V1beta1ModelSpec"):
        validate_inference_service(obj)


def test_explicit_resources_win_over_the_versions_and_a_canary_gets_its_share_by_replicas():
    assert manifests.resources_of(VERSION, {"limits": {"cpu": "2"}}) == {"limits": {"cpu": "2"}}
    assert manifests.resources_of(ServedVersion("m", "1", Path("/")), None) == {}
    assert [manifests.canary_replicas(4, p) for p in (10, 20, 50, 75)] == [1, 1, 4, 12]
