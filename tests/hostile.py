"""Arguments as a hostile ``dag_run.conf`` might pass them: each must reach ``sys.argv`` literally,
through every runner (horovodrun joins its command into a shell string). None may create PWNED."""

from __future__ import annotations

from pathlib import Path

PWNED = Path("/tmp/dnntrain-pwned")
HOSTILE_ARGUMENTS = [
    f"; touch {PWNED}",
    f"$(touch {PWNED})",
    "`id`",
    "a\nb",
    "'q' \"dq\" \\",
    "",
    "*",
    "$HOME",
]
