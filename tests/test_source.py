"""The source snapshot every launcher ships: ``.dnntrainignore`` (gitignore syntax) and the size warning."""

from __future__ import annotations

import io
import logging
import tarfile
from pathlib import Path

import pytest

from airflow_provider_dnntrain import source as source_module
from airflow_provider_dnntrain.backends.common.bundle import run_bundle
from airflow_provider_dnntrain.backends.ssh.shipping import bundle as ssh_bundle
from airflow_provider_dnntrain.source import snapshot
from airflow_provider_dnntrain.spec import TrainingJob
from airflow_provider_dnntrain.topology import render_plan

IGNORE = """\
# data and checkpoints stay where they are
data/
*.ckpt
!keep.ckpt
/notes.txt
"""


def project(root: Path) -> Path:
    files = {
        "train.py": "print('train')\n",
        ".dnntrainignore": IGNORE,
        "data/big.bin": "x" * 1000,
        "model/last.ckpt": "weights",
        "model/keep.ckpt": "weights kept",
        "notes.txt": "top-level only",
        "docs/notes.txt": "nested, not matched by /notes.txt",
        "outputs/stale.txt": "from a manual run",
        "pkg/__pycache__/mod.cpython-311.pyc": "cache",
        "pkg/mod.py": "VALUE = 1\n",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def shipped(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


EXPECTED = {".dnntrainignore", "train.py", "model/keep.ckpt", "docs/notes.txt", "pkg/mod.py"}


def test_the_snapshot_leaves_out_what_dnntrainignore_lists(tmp_path):
    source = project(tmp_path / "src")
    copied = snapshot(source, tmp_path / "snap")
    assert shipped(tmp_path / "snap") == EXPECTED
    assert copied == sum((tmp_path / "snap" / name).stat().st_size for name in EXPECTED)


def test_without_an_ignore_file_everything_but_caches_and_old_outputs_is_shipped(tmp_path):
    source = project(tmp_path / "src")
    (source / ".dnntrainignore").unlink()
    snapshot(source, tmp_path / "snap")
    assert shipped(tmp_path / "snap") == {
        "train.py", "data/big.bin", "model/last.ckpt", "model/keep.ckpt", "notes.txt", "docs/notes.txt",
        "pkg/mod.py",
    }  # fmt: skip


def test_a_large_snapshot_is_shipped_with_a_warning_giving_its_size(tmp_path, monkeypatch, caplog):
    source = project(tmp_path / "src")
    (source / "weights.bin").write_bytes(b"\0" * 3 * 2**20)
    monkeypatch.setattr(source_module, "LARGE_SNAPSHOT_BYTES", 2 * 2**20)
    with caplog.at_level(logging.WARNING, logger="airflow_provider_dnntrain.source"):
        snapshot(source, tmp_path / "snap")
    assert (tmp_path / "snap" / "weights.bin").exists()
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "the snapshot of" in warning and "is 3 MB (more than 2 MB)" in warning
    assert ".dnntrainignore" in warning
    caplog.clear()
    monkeypatch.setattr(source_module, "LARGE_SNAPSHOT_BYTES", 300 * 2**20)
    with caplog.at_level(logging.WARNING, logger="airflow_provider_dnntrain.source"):
        snapshot(source, tmp_path / "again")
    assert not caplog.records


def test_the_ssh_and_kubernetes_bundles_leave_it_out_too(tmp_path):
    source = project(tmp_path / "src")
    with tarfile.open(ssh_bundle(source, tmp_path / "bundle.tar")) as tar:
        names = {m.name.removeprefix("source/") for m in tar.getmembers() if m.isfile()}
    assert names == EXPECTED
    job = TrainingJob(framework="pytorch", source_directory=str(source), entry_script="train.py")
    bundle = run_bundle(source, render_plan(job, "snap"))
    with tarfile.open(fileobj=io.BytesIO(bundle["source.tar.gz"])) as tar:
        names = {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()}
    assert names == EXPECTED


def test_an_earlier_runs_outputs_ship_as_resume_on_every_backend(tmp_path):
    source = project(tmp_path / "src")
    earlier = tmp_path / "earlier-outputs"
    (earlier / "model").mkdir(parents=True)
    (earlier / "checkpoint.pt").write_text("epoch 3")
    (earlier / "model" / "weights.bin").write_text("w")
    resumed = {"resume/checkpoint.pt", "resume/model/weights.bin"}
    snapshot(source, tmp_path / "snap", str(earlier))
    assert shipped(tmp_path / "snap") == EXPECTED | resumed
    with tarfile.open(ssh_bundle(source, tmp_path / "bundle.tar", str(earlier))) as tar:
        assert {m.name.removeprefix("source/") for m in tar.getmembers() if m.isfile()} == EXPECTED | resumed
    job = TrainingJob(
        framework="pytorch",
        source_directory=str(source),
        entry_script="train.py",
        resume_from=str(earlier),
        resume_argument="--resume",
    )
    plan = render_plan(job, "snap")
    assert plan.replicas[0].env["DNNTRAIN_RESUME_FROM"] == "resume"
    assert plan.replicas[0].argv[-2:] == ["--resume", "resume"]
    bundle = run_bundle(source, plan, job.resume_from)
    with tarfile.open(fileobj=io.BytesIO(bundle["source.tar.gz"])) as tar:
        assert {m.name.removeprefix("./") for m in tar.getmembers() if m.isfile()} == EXPECTED | resumed


def test_a_link_out_of_the_source_directory_is_refused_naming_it(tmp_path):
    source, outside = tmp_path / "src", tmp_path / "home" / ".ssh"
    source.mkdir()
    outside.mkdir(parents=True)
    (outside / "id_ed25519").write_text("PRIVATE KEY")
    (source / "train.py").write_text("print('hi')")
    (source / "data").mkdir()
    (source / "data" / "table.csv").write_text("a,b")
    (source / "also-table.csv").symlink_to(source / "data" / "table.csv")  # inside: followed
    snapshot(source, tmp_path / "first")
    assert (tmp_path / "first" / "also-table.csv").read_text() == "a,b"
    (source / "keys").symlink_to(outside)
    with pytest.raises(ValueError, match=r"source_directory: keys links to .*/home/\.ssh, outside .*/src"):
        snapshot(source, tmp_path / "second")
    assert not (tmp_path / "second" / "keys").exists()
    (source / "key").symlink_to(outside / "id_ed25519")
    (source / ".dnntrainignore").write_text("keys\n")
    with pytest.raises(ValueError, match=r"source_directory: key links to"):
        snapshot(source, tmp_path / "third")
    (source / "key").unlink()
    snapshot(source, tmp_path / "fourth")  # a link the ignore file lists is not shipped, so not refused
    assert not (tmp_path / "fourth" / "keys").exists()
