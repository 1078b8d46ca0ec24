"""Log lines as users read them: progress bars, endless lines, secrets split across reads."""

from __future__ import annotations

import tracemalloc

from long_lines import assert_lines_whole_bounded_and_throttled, long_lines_job

from airflow_provider_dnntrain.backends.base import wait_for_job
from airflow_provider_dnntrain.backends.common.lines import (
    MAX_LINE_BYTES,
    PROGRESS_INTERVAL_SECONDS,
    LineSplitter,
    Redactor,
)
from airflow_provider_dnntrain.backends.local.launcher import LocalLauncher


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_progress_bar_shows_its_state_now_and_then_and_its_final_state():
    clock = FakeClock()
    splitter = LineSplitter(clock=clock)
    out = []
    for step in range(1, 101):
        clock.now = step * 0.1  # a redraw every 100 ms for 10 s
        out += splitter.feed(f"\r{step}%|{'#' * (step // 10)}".encode())
    out += splitter.feed(b"\ndone\n")
    assert out[-2:] == ["100%|##########", "done"]
    shown = out[:-2]
    assert 1 <= len(shown) <= 10 / PROGRESS_INTERVAL_SECONDS + 1
    assert all("\r" not in line for line in out)


def test_a_redraw_already_shown_is_not_repeated_when_the_line_ends():
    clock = FakeClock()
    splitter = LineSplitter(clock=clock)
    assert splitter.feed(b"50%\r") == ["50%"]
    clock.now = 100
    assert splitter.feed(b"100%\r") == ["100%"]
    assert splitter.feed(b"\n") == []
    assert splitter.feed(b"\n") == [""]  # a blank line of its own is kept
    assert splitter.feed(b"a\r\nb\n") == ["a", "b"]  # Windows line ends


def test_an_endless_line_is_passed_on_in_pieces_with_bounded_memory():
    splitter = LineSplitter()
    chunk = b"y" * (1 << 16)
    total = 0
    tracemalloc.start()
    for _ in range(320):  # 20 MiB without a newline
        pieces = splitter.feed(chunk)
        assert all(len(piece) <= MAX_LINE_BYTES for piece in pieces)
        total += sum(len(piece) for piece in pieces)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    total += sum(len(piece) for piece in splitter.flush())
    assert total == 320 * len(chunk)  # nothing lost
    assert peak < 8 * MAX_LINE_BYTES  # a few pieces at a time, not 20 MiB


def test_a_secret_is_masked_even_across_a_forced_cut_and_a_chunk_boundary(tmp_path):
    secret = "tok-0123456789-abcdef"
    redactor = Redactor([secret])
    splitter = LineSplitter(redactor)
    data = b"x" * (MAX_LINE_BYTES - 5) + secret.encode() + b" tail\n"
    out = []
    for start in range(0, len(data), 1000):  # arrives in arbitrary reads
        out += splitter.feed(data[start : start + 1000])
    assert secret not in "".join(out) and "***" in "".join(out)
    log = tmp_path / "rank.0" / "stdout"
    log.parent.mkdir()
    log.write_bytes(b"z" * ((1 << 20) - 7) + secret.encode() + b"\n" + secret.encode())
    assert redactor.redact_file(log)
    assert log.read_bytes().count(b"***") == 2 and secret.encode() not in log.read_bytes()


def test_short_values_are_not_masked_like_airflow_does_not():
    assert Redactor(["abc", "longer-one"]).line("abc longer-one") == "abc ***"


def test_progress_bars_and_long_lines_of_a_real_replica(tmp_path):
    job = long_lines_job()
    launcher = LocalLauncher(work_root=tmp_path)
    handle = launcher.submit(job, launcher.plan(job, "progress"), extra_env={})
    lines = []
    wait_for_job(launcher, handle, lines.append, timeout=120)
    assert_lines_whole_bounded_and_throttled([line.text for line in lines])
    assert "\r" not in (handle.run_dir / "logs" / "worker-0.log").read_text()
