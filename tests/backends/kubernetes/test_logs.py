"""How a Kubernetes run's log cursor skips exactly what was logged when a stream is read again."""

from __future__ import annotations

from airflow_provider_dnntrain.backends.kubernetes.logs import LogCursor, Timestamp


def read(cursor: LogCursor, stamped: list[tuple[str, str]]) -> list[str]:
    cursor.resume()
    return [text for stamp, text in stamped if cursor.accepts(stamp)]


def test_kubelet_timestamps_compare_as_instants():
    assert Timestamp.parse("2026-11-24T10:00:00.5Z") == Timestamp.parse("2026-11-24T10:00:00.500000000Z")
    assert Timestamp.parse("2026-11-24T10:00:00Z") < Timestamp.parse("2026-11-24T10:00:00.000000001Z")
    assert Timestamp.parse("2026-11-24T09:59:59.999999999Z") < Timestamp.parse("2026-11-24T10:00:00Z")


def test_a_stream_read_again_skips_what_was_logged_even_lines_sharing_a_timestamp():
    log = [
        ("2026-11-24T10:00:00.1Z", "a"),
        ("2026-11-24T10:00:00.2Z", "b"),
        ("2026-11-24T10:00:00.2Z", "c"),  # same instant as b
        ("2026-11-24T10:00:00.3Z", "d"),
    ]
    cursor = LogCursor()
    assert read(cursor, log[:2]) == ["a", "b"]  # the stream broke after b
    assert (cursor.last, cursor.at_last) == ("2026-11-24T10:00:00.2Z", 1)
    assert read(cursor, log) == ["c", "d"]  # read again from earlier: c is new although stamped as b
    assert read(cursor, log) == []
    # Another watcher, from the saved cursor, logs nothing twice either.
    assert read(LogCursor(cursor.last, cursor.at_last), [*log, ("2026-11-24T10:00:01Z", "e")]) == ["e"]


def test_the_first_read_takes_everything():
    assert read(LogCursor(), [("2026-11-24T10:00:00Z", "x"), ("2026-11-24T10:00:00Z", "y")]) == ["x", "y"]
