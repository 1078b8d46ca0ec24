"""What a Kubernetes job's pods look like beyond the topology: KubernetesPodOperator's knobs, by its names.

Set once for the job (:class:`PodOptions`) and, where a role needs something else (a parameter server
without a GPU, workers on other nodes), per role: a role's options replace the job's field by field.
Kubernetes objects are given as the API's JSON (camelCase dicts) or as the ``kubernetes`` client's
models, as KubernetesPodOperator takes them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

GangScheduler = Literal["kueue", "volcano", "coscheduling"]


def to_api_json(value: Any) -> Any:
    """A ``kubernetes`` client model (or a list of them) as the API's JSON; dicts pass as they are."""
    if value is None or isinstance(value, (dict, str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_api_json(item) for item in value]
    if hasattr(value, "openapi_types"):
        from kubernetes.client import ApiClient

        return ApiClient().sanitize_for_serialization(value)
    raise TypeError(f"expected Kubernetes JSON or a kubernetes client model, got {type(value).__name__}")


class PodOptions(BaseModel):
    """KubernetesPodOperator's pod knobs (same names, same meaning)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] | None = None
    image_pull_secrets: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    affinity: dict[str, Any] | None = None
    tolerations: list[dict[str, Any]] = Field(default_factory=list)
    service_account_name: str | None = None
    volumes: list[dict[str, Any]] = Field(default_factory=list)
    volume_mounts: list[dict[str, Any]] = Field(default_factory=list)
    init_containers: list[dict[str, Any]] = Field(default_factory=list)
    security_context: dict[str, Any] | None = None
    container_security_context: dict[str, Any] | None = None
    container_resources: dict[str, Any] | None = None
    priority_class_name: str | None = None
    schedulername: str | None = None

    @field_validator(
        "affinity",
        "tolerations",
        "volumes",
        "volume_mounts",
        "init_containers",
        "security_context",
        "container_security_context",
        "container_resources",
        mode="before",
    )
    @classmethod
    def _api_json(cls, value: Any) -> Any:
        return to_api_json(value)

    @field_validator("image_pull_secrets", mode="before")
    @classmethod
    def _secret_names(cls, value: Any) -> Any:
        """KPO takes ``"a,b"`` or ``[V1LocalObjectReference(name=...)]``; names are what matter."""
        if isinstance(value, str):
            return [name.strip() for name in value.split(",") if name.strip()]
        return [item if isinstance(item, str) else to_api_json(item)["name"] for item in value or []]

    def over(self, base: PodOptions) -> PodOptions:
        """These options where they are set, ``base``'s elsewhere."""
        return base.model_copy(update={name: getattr(self, name) for name in self.model_fields_set})


def merge_pod_template(template: dict, pod: dict) -> dict:
    """The run's pod over a user's template (``pod_template_file`` / ``full_pod_spec``), merged by the
    cncf-kubernetes provider's own rules: the run's fields win, lists such as volumes are extended,
    containers are matched by position (the template's first is ``base``)."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator
    from kubernetes.client import ApiClient

    merged = PodGenerator.reconcile_pods(
        PodGenerator.deserialize_model_dict(template), PodGenerator.deserialize_model_dict(pod)
    )
    return ApiClient().sanitize_for_serialization(merged)
