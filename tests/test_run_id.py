from __future__ import annotations

import re

from airflow_provider_dnntrain.run_id import make_run_id

DNS_1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def test_stable_within_a_try_and_unique_across_tries():
    first = make_run_id("dag", "train", "manual__2026-01-01T00:00:00+00:00", -1, 1)
    assert first == make_run_id("dag", "train", "manual__2026-01-01T00:00:00+00:00", -1, 1)
    others = {
        make_run_id("dag", "train", "manual__2026-01-01T00:00:00+00:00", -1, 2),
        make_run_id("dag", "train", "manual__2026-01-01T00:00:00+00:00", 0, 1),
        make_run_id("dag", "train2", "manual__2026-01-01T00:00:00+00:00", -1, 1),
        make_run_id("dag", "train", "manual__2026-01-02T00:00:00+00:00", -1, 1),
        make_run_id("dag2", "train", "manual__2026-01-01T00:00:00+00:00", -1, 1),
    }
    assert first not in others and len(others) == 5


def test_lossy_names_do_not_collide():
    assert make_run_id("a_b", "t", "r", -1, 1) != make_run_id("a.b", "t", "r", -1, 1)
    assert make_run_id("A", "t", "r", -1, 1) != make_run_id("a", "t", "r", -1, 1)


def test_is_a_kubernetes_name_even_when_long():
    run_id = make_run_id("D" * 200, "Task.With_Odd CHARS", "backfill__2026-01-01T00:00:00+00:00", 17, 3)
    assert len(run_id) <= 63
    assert DNS_1123_LABEL.match(run_id)
    assert "-t3-" in run_id
