"""A version whose pinned requirements the serving interpreter lacks (here: on this worker, through
LocalServing; SSHServing runs the same agent on its host): served from an environment of the worker's
packages plus those, built with uv once per content and reused; one that cannot be built is refused,
naming what the resolver said, and the version serving goes on serving."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from endpoint_client import ask

from airflow_provider_dnntrain import tracking
from airflow_provider_dnntrain.backends.serving import ServedVersion, ServingFailed, roll_out
from airflow_provider_dnntrain.launchers import LocalServing
from airflow_provider_dnntrain.operators import smoke

ROWS = [[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]]
KEY = "environment-test-key"


def served(version: int, into: Path, requirements: tuple[str, ...]) -> ServedVersion:
    model_dir = Path(tracking.download_model(tracking.resolve_tracking_uri(), "tiny-served", version, into))
    return ServedVersion("tiny-served", str(version), model_dir, requirements=requirements)


def deploy(serving: LocalServing, version: ServedVersion):
    with serving.locked("needs"):
        check = smoke.check(version.model_dir, KEY, None)
        return roll_out(serving, "needs", version, smoke.key_hash(KEY), check)


def test_a_version_is_served_from_an_environment_with_what_the_worker_lacks_built_once(
    tiny_versions, tmp_path
):
    environments = tmp_path / "environments"
    serving = LocalServing(root=tmp_path / "endpoints", environments_root=environments)
    said: list[str] = []
    serving.log = said.append
    try:
        state = deploy(serving, served(tiny_versions[2.0], tmp_path / "a", ("pyjokes==0.8.3",)))
        assert ask(state.scoring_uri, ROWS, KEY) == (
            200,
            [[12.0], [8.0]],
            f"tiny-served/{tiny_versions[2.0]}",
        )
        desired = json.loads((serving.folder("needs") / "desired.json").read_text())
        python = desired["slots"][desired["active"]]["python"]
        assert python.startswith(str(environments))  # its own interpreter, seeing the worker's packages too
        subprocess.run([python, "-c", "import pyjokes, torch, mlflow"], check=True, timeout=120)
        assert "pyjokes==0.8.3 (here: not installed): environment" in said[0] and " built in " in said[0]

        state = deploy(serving, served(tiny_versions[3.0], tmp_path / "b", ("pyjokes==0.8.3",)))
        assert " reused in " in said[1]  # the same content: not built again
        assert ask(state.scoring_uri, ROWS, KEY)[1] == [[18.0], [12.0]]

        with pytest.raises(ServingFailed, match=r"could not be built(.|\n)*pyjokes==99\.0"):
            deploy(serving, served(tiny_versions[1.0], tmp_path / "c", ("pyjokes==99.0",)))
        assert ask(state.scoring_uri, ROWS, KEY)[2] == f"tiny-served/{tiny_versions[3.0]}"
        refusing = LocalServing(root=tmp_path / "endpoints", build_environments=False)
        with pytest.raises(ServingFailed, match=r"lacks: pyjokes==0\.8\.3 \(here: not installed\)"):
            deploy(refusing, served(tiny_versions[1.0], tmp_path / "d", ("pyjokes==0.8.3",)))
    finally:
        serving.undeploy("needs")


def test_a_canary_where_traffic_cannot_be_split_is_refused_before_anything_starts(tmp_path):
    serving = LocalServing(root=tmp_path / "endpoints")
    version = ServedVersion("tiny-served", "1", tmp_path / "model")
    with pytest.raises(
        ServingFailed, match="canary_traffic_percent: LocalServing switches all traffic at once"
    ):
        roll_out(serving, "canary", version, smoke.key_hash(KEY), lambda base: None, canary_percent=20)
    assert not (tmp_path / "endpoints").exists()
