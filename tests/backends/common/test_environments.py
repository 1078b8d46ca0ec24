"""Jobs' environments built for real with uv from the package index: cached by content, built once by
concurrent asks, never used half-built, failing with the resolver's message."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.backends.common import environments
from airflow_provider_dnntrain.backends.common.environments import EnvironmentBuildFailed, ensure_environment
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher
from airflow_provider_dnntrain.spec import TrainingJob

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
PACKAGE = "pyjokes==0.8.3"  # small, pure Python, not in the project's environment


def test_the_project_environment_lacks_the_package():
    assert subprocess.run([sys.executable, "-c", "import pyjokes"], capture_output=True).returncode != 0


@pytest.mark.slow
def test_an_environment_is_built_once_and_reused(tmp_path):
    first = ensure_environment(str(tmp_path), sys.executable, [PACKAGE], "")
    assert first["built"] and "pyjokes==0.8.3" in first["freeze"]
    check = (
        "import importlib.metadata as m, pyjokes, psutil; print(m.version('pyjokes'))"  # its own, the base's
    )
    assert subprocess.run([first["python"], "-c", check], capture_output=True, text=True).stdout == "0.8.3\n"
    began = time.monotonic()
    again = ensure_environment(str(tmp_path), sys.executable, [PACKAGE], "")
    assert (again["built"], again["python"]) == (False, first["python"])
    assert time.monotonic() - began < 1
    other = ensure_environment(str(tmp_path), sys.executable, [PACKAGE], "inflection==0.5.1\n")
    assert other["built"] and other["python"] != first["python"]  # other content, other environment


@pytest.mark.slow
def test_two_asks_at_once_build_it_once(tmp_path):
    spec = json.dumps({"python": sys.executable, "packages": [PACKAGE], "requirements": ""})
    asks = [
        subprocess.Popen([sys.executable, environments.__file__, str(tmp_path), spec], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    answers = [json.loads(ask.communicate(timeout=600)[0]) for ask in asks]
    assert sorted(answer["built"] for answer in answers) == [False, True]
    assert answers[0]["python"] == answers[1]["python"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == [answers[0]["key"]]


@pytest.mark.slow
def test_a_failed_build_names_the_package_shows_the_resolver_and_leaves_nothing(tmp_path):
    with pytest.raises(EnvironmentBuildFailed) as failed:
        ensure_environment(str(tmp_path), sys.executable, ["dnntrain-no-such-package==1.0"], "")
    message = str(failed.value)
    assert message.startswith("environment.pip_packages: installing dnntrain-no-such-package==1.0 failed:")
    assert "dnntrain-no-such-package" in message.split("failed:", 1)[1]  # uv's own account of it
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")] == []


@pytest.mark.slow
def test_a_local_job_runs_in_its_environment_and_records_its_packages(tmp_path):
    launcher = LocalLauncher(work_root=str(tmp_path / "runs"), environments_root=str(tmp_path / "envs"))
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(SCRIPTS),
        entry_script="uses_package.py",
        environment={"pip_packages": [PACKAGE]},
    )
    plan = launcher.plan(job, "env-run")
    assert plan.replicas[0].argv[0].startswith(str(tmp_path / "envs"))  # the plan says which
    handle = launcher.submit(job, plan, extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=300)
    assert any(line.text.startswith("pyjokes 0.8.3 psutil ") for line in lines), lines
    record = launcher.collect_outputs(handle) / "logs" / "environment.txt"
    assert "pyjokes==0.8.3" in record.read_text()  # what the tracking run keeps among its artifacts
