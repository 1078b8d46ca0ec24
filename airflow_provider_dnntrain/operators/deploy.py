"""Deploy a registered version behind an endpoint (blue/green, smoke-tested, then promoted in the
registry), and take an endpoint down."""

from __future__ import annotations

import json
import re
import secrets
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from airflow.sdk import Asset, AssetAlias, BaseOperator

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.backends.serving import ServedVersion, Serving, checked_endpoint, roll_out
from airflow_provider_dnntrain.operators import smoke

ENDPOINTS_ALIAS = "dnntrain-endpoints"
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(/(?P<version>\d+)|@(?P<alias>[\w-]+))$")


def endpoint_asset(name: str) -> Asset:
    """The Asset an endpoint's changes are events of (extra: version, scoring URI)."""
    return Asset(f"endpoint://{name}")


def key_variable(endpoint: str) -> str:
    """The Airflow Variable that keeps an endpoint's key (masked: its name says ``api_key``)."""
    return f"dnntrain_endpoint_{endpoint}_api_key"


def default_serving() -> Serving:
    from airflow_provider_dnntrain.backends.local.serving import LocalServing

    return LocalServing()


class DeployModelOperator(BaseOperator):
    """Serve ``model`` (``models:/<name>/<version>`` or ``models:/<name>@<alias>``) at ``endpoint``.

    The version starts beside the one serving; it must answer ``GET /ping`` and the smoke test - its
    input example (or ``smoke_test=``: rows of input, or a callable ``(base_url, headers)`` that raises)
    gives through the endpoint what ``mlflow.pyfunc`` gives here - before traffic moves to it. A failed
    check stops it, leaves the old version serving and fails the task. Serving it already: nothing
    happens. ``promote_alias`` then points the registry's alias at it. ``must_beat="champion"`` with
    ``metric=``: deploy only if the version's run beat that alias's on the metric, else skip.
    ``canary_traffic_percent`` (Kubernetes): about that share of the requests only, the old version
    serving the rest; a later deploy of the same version moves it, and 100 finishes (then the alias
    moves). Deploying the other version rolls the canary back.

    ``serving=``: where (``LocalServing()`` by default, a process on this worker's host that outlives
    the task; ``SSHServing``; ``KubernetesServing``). Returns the endpoint: ``scoring_uri``,
    ``health_uri``, model, version, run ids, state, ``traffic`` and ``key_variable``, the Airflow
    Variable with the endpoint's key (``Authorization: Bearer <key>``).
    """

    template_fields: Sequence[str] = (
        "model",
        "endpoint",
        "promote_alias",
        "must_beat",
        "metric",
        "tracking_uri",
        "canary_traffic_percent",
    )
    ui_color = "#d6eaf8"

    def __init__(
        self,
        *,
        model: str,
        endpoint: str,
        serving: Serving | None = None,
        promote_alias: str | None = None,
        smoke_test: list | Callable[[str, dict], None] | None = None,
        must_beat: str | None = None,
        metric: str | None = None,
        greater_is_better: bool = True,
        canary_traffic_percent: int | str | None = None,
        tracking_uri: str | None = None,
        tracking_conn_id: str | None = tracking.DEFAULT_CONN_ID,
        **kwargs: Any,
    ) -> None:
        kwargs["outlets"] = [*kwargs.get("outlets", []), _outlet(endpoint)]
        super().__init__(**kwargs)
        if must_beat and not metric:
            raise ValueError("metric: must_beat compares a metric; name it (metric='validation_acc')")
        if "{" not in endpoint:
            checked_endpoint(endpoint)
        if "{" not in model:
            _model_uri(model)
        self.model = model
        self.endpoint = endpoint
        self.serving = serving
        self.promote_alias = promote_alias
        self.smoke_test = smoke_test
        self.must_beat = must_beat
        self.metric = metric
        self.greater_is_better = greater_is_better
        self.canary_traffic_percent = canary_traffic_percent
        if not isinstance(canary_traffic_percent, str):
            _percent(canary_traffic_percent)
        self.tracking_uri = tracking_uri
        self.tracking_conn_id = tracking_conn_id

    def execute(self, context) -> dict[str, Any]:
        target = tracking.resolve_target(self.tracking_uri, self.tracking_conn_id)
        with target.credentials_in_env():
            return self._deploy(context, target)

    def _deploy(self, context, target: tracking.TrackingTarget) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        uri = target.uri
        client = tracking.client(uri)
        version = resolve_version(client, self.model)
        if self.must_beat and (reason := self._short_of(client, version)):
            raise AirflowSkipException(reason)
        serving = self.serving or default_serving()
        key = self._key() if serving.requires_key else None
        if key is None:
            kind = type(serving).__name__
            self.log.info("%s checks no key of its own: the cluster's gateway authenticates callers", kind)
        with tempfile.TemporaryDirectory(prefix="dnntrain-deploy-") as work:
            model_dir = Path(tracking.download_model(uri, version.name, version.version, Path(work)))
            if not (model_dir / "MLmodel").is_file():
                raise ValueError(
                    f"model: {self.model} is files, not a model MLflow loads (registered with "
                    "model_format='files'?); register it with its format to serve it"
                )
            served = ServedVersion(
                version.name,
                version.version,
                model_dir,
                requirements=tuple(version.tags.get("requirements", "").split()),
                framework=version.tags.get("framework", ""),
                resources=json.loads(version.tags.get("resource_configuration") or "{}"),
                registry_uri=uri,
                registry_credentials=dict(target.credentials),
                artifact_uri=client.get_model_version_download_uri(version.name, version.version),
            )
            check = smoke.check(model_dir, key, self.smoke_test)
            with serving.locked(self.endpoint):
                state = roll_out(
                    serving, self.endpoint, served, smoke.key_hash(key or ""), check, self.log.info,
                    canary_percent=_percent(self.canary_traffic_percent),
                )  # fmt: skip
        if self.promote_alias and state.serving == served.label and len(state.traffic) == 1:
            client.set_registered_model_alias(version.name, self.promote_alias, version.version)
            self.log.info(
                "Alias %s of %s now points at version %s", self.promote_alias, version.name, version.version
            )
        result = {
            "endpoint": self.endpoint,
            "scoring_uri": state.scoring_uri,
            "health_uri": state.health_uri,
            "model_name": version.name,
            "model_version": int(version.version),
            "run_id": version.tags.get("dnntrain.run_id", version.run_id),
            "tracking_run_id": version.run_id,
            "state": state.state,
            "traffic": {state.slots[slot]: share for slot, share in state.traffic.items()},
            "key_variable": key_variable(self.endpoint) if key else None,
        }
        self.log.info("Endpoint %s serves %s at %s", self.endpoint, state.serving, state.scoring_uri)
        self._emit(context, result)
        return result

    def _key(self) -> str:
        """The endpoint's key: kept in an Airflow Variable, made on its first deploy."""
        from airflow.sdk import Variable
        from airflow.sdk.log import mask_secret

        name = key_variable(self.endpoint)
        key = Variable.get(name, default=None)
        if not key:
            key = secrets.token_urlsafe(32)
            Variable.set(name, key, description=f"the key of the dnntrain endpoint {self.endpoint}")
        mask_secret(key)
        return key

    def _short_of(self, client, version) -> str | None:
        """Why ``version`` does not beat the ``must_beat`` alias's on ``metric`` (None: it does)."""
        try:
            incumbent = client.get_model_version_by_alias(version.name, self.must_beat)
        except Exception:
            return None  # nothing to beat yet
        mine = client.get_run(version.run_id).data.metrics.get(self.metric)
        theirs = client.get_run(incumbent.run_id).data.metrics.get(self.metric)
        if mine is None:
            return f"version {version.version} has no metric {self.metric!r}; not deploying it"
        if theirs is None or (mine > theirs if self.greater_is_better else mine < theirs):
            return None
        return (
            f"version {version.version} has {self.metric}={mine}, not better than {self.must_beat} "
            f"(version {incumbent.version}: {theirs}); not deploying it"
        )

    def _emit(self, context, result: dict[str, Any]) -> None:
        extra = {
            "version": result["model_version"],
            "model": result["model_name"],
            "scoring_uri": result["scoring_uri"],
        }
        asset = endpoint_asset(self.endpoint)
        if asset in self.outlets:
            context["outlet_events"][asset].extra = extra
        else:
            context["outlet_events"][AssetAlias(ENDPOINTS_ALIAS)].add(asset, extra=extra)


class UndeployModelOperator(BaseOperator):
    """Take ``endpoint`` down: every version it serves, its port, its files. Its key is kept (a later
    deploy of the same endpoint keeps its callers' key); ``forget_key=True`` deletes it too."""

    template_fields: Sequence[str] = ("endpoint",)

    def __init__(
        self, *, endpoint: str, serving: Serving | None = None, forget_key: bool = False, **kwargs: Any
    ):
        super().__init__(**kwargs)
        self.endpoint = endpoint
        self.serving = serving
        self.forget_key = forget_key

    def execute(self, context) -> bool:
        serving = self.serving or default_serving()
        with serving.locked(self.endpoint):
            removed = serving.undeploy(self.endpoint)
        if self.forget_key:
            from airflow.sdk import Variable

            Variable.delete(key_variable(self.endpoint))
        self.log.info("Endpoint %s %s", self.endpoint, "removed" if removed else "was not there")
        return removed


def resolve_version(client, model: str):
    """The registry's version a ``models:/`` URI names (a number or an alias)."""
    match = _model_uri(model)
    if match["alias"]:
        return client.get_model_version_by_alias(match["name"], match["alias"])
    return client.get_model_version(match["name"], match["version"])


def _model_uri(model: str) -> re.Match:
    match = _MODEL_URI.match(model or "")
    if not match:
        raise ValueError(f"model: {model!r} is not models:/<name>/<version> nor models:/<name>@<alias>")
    return match


def _percent(value: int | str | None) -> int | None:
    """``canary_traffic_percent`` as a number from 1 to 100 (None: all the traffic at once)."""
    if value in (None, ""):
        return None
    try:
        percent = int(value)
    except (TypeError, ValueError):
        percent = -1
    if not 0 < percent <= 100:
        raise ValueError(f"canary_traffic_percent: {value!r} is not a whole number from 1 to 100")
    return percent


def _outlet(endpoint: str) -> Asset | AssetAlias:
    return AssetAlias(ENDPOINTS_ALIAS) if "{" in endpoint else endpoint_asset(endpoint)
