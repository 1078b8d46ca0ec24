"""Files the tests poll for while a job runs are written whole: a test that sees one can read it."""

from __future__ import annotations

import os
from pathlib import Path


def publish(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)
