"""``pip install airflow-provider-dnntrain`` alone gives a working first DAG: the wheel built from this
checkout, installed by itself into a fresh virtual environment (no extra, no framework), runs a one-task
DAG with tracking on, as a new user would try it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIRST_DAG = """
import pendulum
from airflow.sdk import DAG

from airflow_provider_dnntrain.operators import TensorFlowTrainOperator

with DAG("first_dag", schedule=None, start_date=pendulum.datetime(2026, 1, 1, tz="UTC")):
    TensorFlowTrainOperator(task_id="train", source_directory="src", entry_script="train.py", arguments=["3"])
"""
# The user's script: what a first script does before it trains anything real (no framework installed).
TRAIN = """
import os, sys
import mlflow

os.makedirs("outputs", exist_ok=True)
for epoch in range(int(sys.argv[1])):
    mlflow.log_metric("loss", 1.0 / (epoch + 1), step=epoch)
    print(f"epoch={epoch}")
open("outputs/model.txt", "w").write("weights")
"""
RUNS = """
import json, sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
print(json.dumps([{"status": r.info.status, "metrics": r.data.metrics} for r in runs]))
"""


def run(argv: list, env: dict, timeout: float = 600) -> str:
    done = subprocess.run([str(a) for a in argv], env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{argv[:3]}: {done.stdout[-4000:]}{done.stderr[-4000:]}"
    return done.stdout + done.stderr


def test_the_wheel_alone_runs_a_first_dag_with_tracking(tmp_path):
    uv = shutil.which("uv") or Path(sys.executable).with_name("uv")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW", "VIRTUAL_ENV"))}
    build = [uv, "build", "--wheel", "--quiet", "--build-constraint", REPO / "constraints.txt"]
    run([*build, "--out-dir", tmp_path / "dist", REPO], clean)
    (wheel,) = (tmp_path / "dist").glob("airflow_provider_dnntrain-*.whl")
    venv = tmp_path / "fresh"
    run([uv, "venv", "--quiet", "--python", sys.executable, venv], clean)
    # The tested versions (constraints.txt) of what the wheel asks for, and nothing it does not ask for.
    python = venv / "bin" / "python"
    run([uv, "pip", "install", "--quiet", "--python", python, "-c", REPO / "constraints.txt", wheel], clean)

    home, dags = tmp_path / "home", tmp_path / "dags"
    (dags / "src").mkdir(parents=True)
    (dags / "first_dag.py").write_text(FIRST_DAG)
    (dags / "src" / "train.py").write_text(TRAIN)
    env = {
        **clean,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(dags),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": f"{venv / 'bin'}{os.pathsep}{clean['PATH']}",
    }
    airflow = venv / "bin" / "airflow"
    assert "airflow-provider-dnntrain" in run([airflow, "providers", "list"], env)
    run([airflow, "db", "migrate"], env)
    output = run([airflow, "dags", "test", "first_dag"], env)
    assert "[worker-0] epoch=2" in output, output[-3000:]

    store = f"sqlite:///{home / 'dnntrain' / 'mlflow.db'}"
    runs = json.loads(run([python, "-c", RUNS, store], env).strip().splitlines()[-1])
    assert [r["status"] for r in runs] == ["FINISHED"]
    assert runs[0]["metrics"]["loss"] == 1.0 / 3  # the script's last value, logged by rank 0 to the run
    assert not any(
        p.name.startswith(("tensorflow", "torch")) for p in venv.glob("lib/python*/site-packages/*")
    )


def test_every_lower_bound_is_the_version_the_suite_runs():
    """A floor is a promise: each one in pyproject.toml is the version constraints.txt pins, which is
    what every test here runs with (a floor below it would be a version nobody tried)."""
    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    pins = dict(
        line.split("==", 1) for line in (REPO / "constraints.txt").read_text().splitlines() if "==" in line
    )
    pins = {name.lower().replace("_", "-"): version.strip() for name, version in pins.items()}
    # torch comes from pip's local CPU wheels, pinned in the Makefile rather than constraints.txt.
    pins["torch"] = re.search(r"torch==(\S+)", (REPO / "Makefile").read_text()).group(1)
    wanted = [*project["build-system"]["requires"], *project["project"]["dependencies"]]
    wanted += [r for extra in project["project"]["optional-dependencies"].values() for r in extra]
    floors = {}
    for text in wanted:
        requirement = Requirement(text)
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        assert lower, f"{text}: no lower bound"
        floors[requirement.name.lower()] = lower[0]
    untested = {name: (floor, pins.get(name)) for name, floor in floors.items() if pins.get(name) != floor}
    untested.pop("horovod", None)  # built from source by scripts/build-horovod.sh at exactly its floor
    assert not untested, f"floors that are not the tested version (floor, tested): {untested}"
