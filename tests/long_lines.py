"""One check of the line reader every backend shares (backends/common/lines.py), run on each backend:
a replica that draws a tqdm progress bar with carriage returns, writes a 300 KB line, and ends with a
line that has no newline."""

from __future__ import annotations

from pathlib import Path

from airflow_provider_dnntrain.backends.common.lines import MAX_LINE_BYTES
from airflow_provider_dnntrain.spec import TrainingJob

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def long_lines_job() -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(SCRIPTS),
        entry_script="replica.py",
        arguments=["--progress", "500", "--long-line", "300000", "--partial"],
    )


def assert_lines_whole_bounded_and_throttled(texts: list[str]) -> None:
    bars = [text for text in texts if "worker-0 epoch" in text]
    assert 1 <= len(bars) <= 3 and "500/500" in bars[-1]  # not 500 lines, and the end is there
    long_pieces = [text for text in texts if set(text) == {"y"}]
    assert sum(map(len, long_pieces)) == 300000 and max(map(len, long_pieces)) <= MAX_LINE_BYTES
    assert texts[-1] == "worker-0 partial-end"  # nothing lost at the end
