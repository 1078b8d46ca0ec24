from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

DNNTRAIN = str(Path(sys.executable).with_name("dnntrain"))


def test_render_yaml_job_file(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text("print('hi')\n")
    job_file = tmp_path / "job.yaml"
    job_file.write_text(
        yaml.safe_dump(
            {
                "framework": "tensorflow",
                "source_directory": "src",
                "entry_script": "train.py",
                "arguments": {"--epochs": 3},
                "distribution": {"kind": "parameter_server", "worker_count": 2, "parameter_server_count": 1},
                "environment": {"secrets": {"TOKEN": "do-not-print"}},
            }
        )
    )
    out = subprocess.run(
        [DNNTRAIN, "render", str(job_file)], capture_output=True, text=True, check=True
    ).stdout
    plan = json.loads(out)
    assert [r["name"] for r in plan["replicas"]] == ["chief-0", "ps-0", "worker-0", "worker-1"]
    tf_config = json.loads(plan["replicas"][3]["env"]["TF_CONFIG"])
    assert tf_config["cluster"]["worker"] == ["worker-0:2222", "worker-1:2222"]
    assert plan["replicas"][0]["argv"] == ["python", "train.py", "--epochs", "3"]
    assert "do-not-print" not in out


def test_render_json_job_file_with_an_error_names_the_field(tmp_path):
    job_file = tmp_path / "job.json"
    job_file.write_text(
        json.dumps(
            {
                "framework": "pytorch",
                "entry_script": "t.py",
                "distribution": {"kind": "torch_distributed", "process_count_per_node": 0},
            }
        )
    )
    result = subprocess.run([DNNTRAIN, "render", str(job_file)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "process_count_per_node" in result.stderr


def test_render_refuses_a_missing_source_directory_or_script(tmp_path):
    job_file = tmp_path / "job.yaml"
    job = {"framework": "pytorch", "source_directory": "missing", "entry_script": "train.py"}
    job_file.write_text(yaml.safe_dump(job))
    result = subprocess.run([DNNTRAIN, "render", str(job_file)], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (2, "")
    assert f"source_directory: '{tmp_path / 'missing'}' is not a directory" in result.stderr
    (tmp_path / "missing").mkdir()
    result = subprocess.run([DNNTRAIN, "render", str(job_file)], capture_output=True, text=True)
    assert result.returncode == 2
    assert "entry_script: 'train.py' is not a file in" in result.stderr


def test_render_for_kubernetes_prints_every_object_a_run_creates(tmp_path):
    (tmp_path / "train.py").write_text("print('hi')\n")
    job_file = tmp_path / "job.yaml"
    job = {
        "framework": "pytorch",
        "source_directory": ".",
        "entry_script": "train.py",
        "distribution": {"kind": "torch_distributed", "node_count": 2},
        "environment": {"secrets": {"TOKEN": "do-not-print"}},
    }
    job_file.write_text(yaml.safe_dump(job))
    command = [DNNTRAIN, "render", str(job_file), "--launcher", "kubernetes", "--namespace", "ml"]
    out = subprocess.run([*command, "--run-id", "nightly"], capture_output=True, text=True, check=True).stdout
    objects = list(yaml.safe_load_all(out))
    assert [o["kind"] for o in objects] == ["ConfigMap", "Secret", "Service", "Pod", "Pod"]
    assert [o["metadata"]["name"] for o in objects[3:]] == ["nightly-node-0", "nightly-node-1"]
    assert {o["metadata"]["namespace"] for o in objects[1:]} == {"ml"}
    assert "do-not-print" not in out
