"""The README and every page of docs/ run: each code block is executed (Python), loaded and used (a job
file), run (shell), checked against the tree it draws (a file tree), or found word for word in the
example DAG it quotes - so the documentation cannot drift from the code."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
QUOTED_FROM = re.compile(r"<!-- from (\S+) -->\s*$")
TRAIN_SCRIPT = "import os\nos.makedirs('outputs', exist_ok=True)\nprint('trained')\n"


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    quoted_from: str | None  # an example DAG the block is quoted from, word for word


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        quoted = QUOTED_FROM.search(before)
        found.append(Block(match.group(1), match.group(2), quoted.group(1) if quoted else None))
    return found


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """Where a page's blocks run: a DAG folder with ``src/train.py``, the example scripts as
    ``scripts/``, and ``.venv`` (the environment the tests run in), as the docs assume."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train.py").write_text(TRAIN_SCRIPT)
    (tmp_path / "src" / "requirements.txt").write_text("tqdm\n")
    (tmp_path / "scripts").symlink_to(REPO / "dags" / "scripts")
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_python(block: Block, page: Path, namespace: dict, workspace: Path) -> None:
    if block.quoted_from:
        quoted = (REPO / block.quoted_from).read_text()
        assert block.code in quoted, f"{page.name}: a block quoted from {block.quoted_from} is not in it"
        return
    # Compiled as a DAG file in the workspace: a DAG's relative source_directory is relative to it.
    exec(compile(block.code, str(workspace / f"{page.stem}_dag.py"), "exec"), namespace)


def run_job_file(block: Block, page: Path, workspace: Path) -> None:
    name = block.code.splitlines()[0].removeprefix("#").strip()
    assert name.endswith((".yaml", ".yml", ".json")), f"{page.name}: a job file block starts with # <name>"
    assert isinstance(yaml.safe_load(block.code), dict)
    (workspace / name).write_text(block.code)


def run_shell(block: Block, page: Path, workspace: Path) -> None:
    for line in block.code.splitlines():
        command = line.split(" #", 1)[0].strip()
        if not command:
            continue
        done = subprocess.run(
            shlex.split(command), cwd=workspace, capture_output=True, text=True, timeout=300, check=False
        )
        assert done.returncode == 0, f"{page.name}: {command}: {done.stderr[-3000:]}"


def check_tree(block: Block, page: Path) -> None:
    """Every path a file tree names (two spaces per level, folders ending in /) exists."""
    folders: list[str] = []
    for line in block.code.splitlines():
        entry = line.split()[0] if line.strip() else ""
        if not entry:
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2
        folders = folders[:depth]
        path = Path(REPO, *folders, entry.rstrip("/"))
        assert path.exists(), f"{page.name}: {path.relative_to(REPO)} is in the tree, not in the repository"
        if entry.endswith("/"):
            folders.append(entry.rstrip("/"))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(REPO)))
def test_every_code_block_runs(page, workspace):
    namespace: dict = {}
    found = blocks(page)
    assert len(found) == page.read_text().count("\n```") // 2, f"{page.name}: a fence not understood"
    if page == README:
        found = found[1:]  # the two set-up commands: test_the_readme_starts_with_the_two_commands
    for block in found:
        if block.language == "python":
            run_python(block, page, namespace, workspace)
        elif block.language in ("yaml", "json"):
            run_job_file(block, page, workspace)
        elif block.language == "bash":
            run_shell(block, page, workspace)
        elif block.language == "text":
            check_tree(block, page)
        else:
            pytest.fail(f"{page.name}: a ```{block.language} block, which no test runs")


def test_the_readme_starts_with_the_two_commands_and_the_demo_trains():
    first = blocks(README)[0]
    assert README.read_text().split("\n", 2)[2].startswith("```bash"), "the commands come first"
    assert [line.split("#")[0].strip() for line in first.code.splitlines()] == ["make demo", "make test"]
    # CI runs the second (`make test` is what runs this test); the first runs here, with the
    # environment the suite runs in (make test built it: its stamp is this interpreter).
    assert "make test" in (REPO / ".ci" / "run").read_text().splitlines()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    venv = Path(sys.executable).parents[1]
    done = subprocess.run(
        ["make", "demo", f"VENV={venv}", f"STAMP={sys.executable}"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-3000:]
    assert re.search(r"\[worker-[01]\] epoch=\d+ loss=[0-9.]+ accuracy=[0-9.]+", done.stdout), done.stdout
    assert re.search(r"Registered model digits version \d+ from run", done.stdout)
    # The endpoint answered the version's own example with its key, then was taken down.
    assert re.search(
        r"digits/\d+ at http://127.0.0.1:\d+/invocations answered 200: \{\"predictions\"", done.stdout
    )
    assert (
        'curl -H "Authorization: Bearer $(airflow variables get dnntrain_endpoint_digits_api_key)"'
        in done.stdout
    )
    assert '{"endpoint": "digits", "removed": true}' in done.stdout
