"""Writes what each of the job's inputs holds, as the script found it, to outputs/inputs.json (tests)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def contents(path: Path) -> dict[str, str]:
    if path.is_file():
        return {path.name: path.read_text()}
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


found = {
    name[len("DNNTRAIN_INPUT_") :].lower(): {"path": value, "files": contents(Path(value))}
    for name, value in os.environ.items()
    if name.startswith("DNNTRAIN_INPUT_")
}
print("inputs: " + json.dumps(found, sort_keys=True), flush=True)
Path("outputs").mkdir(exist_ok=True)
Path("outputs/inputs.json").write_text(json.dumps({"inputs": found, "argv": sys.argv[1:]}))
