"""The replica site (what every replica's Python runs first), in real interpreters started as a
launcher starts them: with its folder leading PYTHONPATH."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from airflow_provider_dnntrain.backends.common.replica import REPLICA_SITE

SHOW = "import json, os; print(json.dumps({{k: os.environ.get(k) for k in {keys!r}}}))"
KEYS = ["MLFLOW_RUN_ID", "MLFLOW_RUN_CONTEXT", "MLFLOW_EXPERIMENT_ID", "API_TOKEN"]


def start(tmp_path: Path, argv: list[str], env: dict[str, str], extra_path: str = "") -> subprocess.Popen:
    (tmp_path / "train.py").write_text(SHOW.format(keys=KEYS))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DNNTRAIN", "MLFLOW"))}
    path = os.pathsep.join(filter(None, [str(REPLICA_SITE), extra_path]))
    return subprocess.Popen(
        [sys.executable, *argv],
        cwd=tmp_path,
        env={**base, "DNNTRAIN_ENTRY_SCRIPT": "train.py", "PYTHONPATH": path, **env},
        stdout=subprocess.PIPE,
        text=True,
    )


def seen(process: subprocess.Popen) -> dict:
    out, _ = process.communicate(timeout=30)
    return json.loads(out.strip().splitlines()[-1])


def test_global_rank_zero_is_primary_on_whichever_node_it_landed(tmp_path):
    env = {"DNNTRAIN_ROLE": "node", "DNNTRAIN_REPLICA_INDEX": "1", "DNNTRAIN_PRIMARY_REPLICA": "node-0"}
    env.update(
        {"DNNTRAIN_TRACKING_RUN_ID": "parent123", "MLFLOW_RUN_ID": "parent123", "DNNTRAIN_RUN_ID": "job"}
    )
    primary = seen(start(tmp_path, ["train.py"], {**env, "RANK": "0"}))
    assert primary["MLFLOW_RUN_ID"] == "parent123" and primary["MLFLOW_RUN_CONTEXT"] is None
    assert (tmp_path / ".dnntrain-primary").exists()  # the run's outputs are collected from here
    (tmp_path / ".dnntrain-primary").unlink()
    other = seen(start(tmp_path, ["train.py"], {**env, "DNNTRAIN_REPLICA_INDEX": "0", "RANK": "1"}))
    assert other["MLFLOW_RUN_ID"] is None
    assert json.loads(other["MLFLOW_RUN_CONTEXT"]) == {
        "mlflow.parentRunId": "parent123",
        "mlflow.runName": "job-node-0-rank1",
        "dnntrain.replica": "node-0-rank1",
    }
    assert not (tmp_path / ".dnntrain-primary").exists()


def test_the_chief_is_primary_when_there_are_no_ranks(tmp_path):
    env = {"DNNTRAIN_ROLE": "chief", "DNNTRAIN_REPLICA_INDEX": "0", "DNNTRAIN_PRIMARY_REPLICA": "chief-0"}
    env["DNNTRAIN_TRACKING_RUN_ID"] = "parent123"
    assert seen(start(tmp_path, ["train.py"], env))["MLFLOW_RUN_ID"] == "parent123"
    worker = seen(start(tmp_path, ["train.py"], {**env, "DNNTRAIN_ROLE": "worker"}))
    assert json.loads(worker["MLFLOW_RUN_CONTEXT"])["dnntrain.replica"] == "worker-0"


def test_script_processes_wait_for_pending_values_and_runners_do_not(tmp_path):
    pending = tmp_path / "pending.json"
    pending.write_text(json.dumps({"API_TOKEN": "s3cret-value"}))  # secrets are there from the start
    env = {
        "DNNTRAIN_PENDING_ENV": "API_TOKEN,MLFLOW_RUN_ID,MLFLOW_EXPERIMENT_ID",
        "DNNTRAIN_PENDING_ENV_FILE": str(pending),
    }
    runner = start(tmp_path, ["-c", SHOW.format(keys=KEYS)], env)  # not the entry script: a runner
    assert seen(runner) == dict.fromkeys(KEYS)  # started at once, holding nothing
    # A writer caught half-way (another backend may not replace the file whole) is waited out too.
    pending.write_text('{"API_TOKEN": "s3cr')
    started = time.monotonic()
    script = start(tmp_path, ["train.py"], env)
    late = {"API_TOKEN": "s3cret-value", "MLFLOW_RUN_ID": "abc", "MLFLOW_EXPERIMENT_ID": "7"}
    written = tmp_path / "pending.writing"
    written.write_text(json.dumps(late))
    threading.Timer(1.0, lambda: written.replace(pending)).start()
    values = seen(script)
    assert script.returncode == 0
    assert time.monotonic() - started >= 1.0
    assert values == {
        "MLFLOW_RUN_ID": "abc",
        "MLFLOW_RUN_CONTEXT": None,
        "MLFLOW_EXPERIMENT_ID": "7",
        "API_TOKEN": "s3cret-value",
    }


def test_a_sitecustomize_it_shadows_still_runs(tmp_path):
    other = tmp_path / "other_site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import os\nos.environ['API_TOKEN'] = 'from-the-other-site'\n")
    assert (
        seen(start(tmp_path, ["train.py"], {}, extra_path=str(other)))["API_TOKEN"] == "from-the-other-site"
    )


def test_each_line_leaves_in_one_write_even_unbuffered(tmp_path):
    """mpirun tags every chunk it reads: print's text and newline written apart (as PYTHONUNBUFFERED
    does) reached the log as ``[1,0]<stdout>:text[1,0]<stdout>:``. Every write to a seqpacket socket
    is one message, so the messages received are the writes made."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    script = "import sys; print('rank 0', 'loss=0.5'); print('step', 2, file=sys.stderr)"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("DNNTRAIN", "MLFLOW"))}
    with theirs:
        subprocess.run(
            [sys.executable, "-c", script],
            env={**base, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPLICA_SITE)},
            stdout=theirs,
            stderr=theirs,
            check=True,
            timeout=30,
        )
    writes = list(iter(lambda: ours.recv(65536), b""))  # b"": every writer has closed
    assert writes == [b"rank 0 loss=0.5\n", b"step 2\n"]
