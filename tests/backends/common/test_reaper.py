"""The reaper on its own: what the command it runs sees, and what it reports back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from airflow_provider_dnntrain.backends.common.replica import REAPER


def reaped(*command: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-I", "-S", str(REAPER), "--grace", "1", "--", *command],
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_the_command_gets_default_signal_dispositions_back():
    """Python ignores SIGPIPE; a shell pipeline under the reaper must end as it does in a terminal."""
    result = reaped("sh", "-c", "yes | head -n 2; grep SigIgn /proc/self/status")
    assert result.stdout.splitlines()[:2] == ["y", "y"]
    ignored = int(result.stdout.split("SigIgn:")[1].split()[0], 16)
    assert not ignored & (1 << (13 - 1))  # SIGPIPE (13) is not ignored


def test_the_exit_status_is_the_commands():
    assert reaped("sh", "-c", "exit 3").returncode == 3
    assert reaped("sh", "-c", "kill -TERM $$").returncode == -15
    missing = reaped("no-such-command-dnntrain")
    assert missing.returncode == 127 and "cannot start 'no-such-command-dnntrain'" in missing.stderr


def test_what_an_exited_command_left_behind_is_stopped():
    result = reaped("sh", "-c", "setsid sleep 300 & echo $!")
    leftover = int(result.stdout.strip())
    assert result.returncode == 0
    assert (
        not Path(f"/proc/{leftover}").exists() or "Z" in Path(f"/proc/{leftover}/stat").read_text().split()[2]
    )
