"""A client of a deployed endpoint, as a user's code calls it."""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit


def ask(scoring_uri: str, rows: list, key: str | None) -> tuple[int, list | None, str | None]:
    """Status, predictions and the version that answered (status 0: nothing listens)."""
    request = urllib.request.Request(scoring_uri, data=json.dumps({"inputs": rows}).encode())
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.load(answer)["predictions"], answer.headers.get("x-model-version")
    except urllib.error.HTTPError as error:
        return error.code, None, error.headers.get("x-model-version")
    except OSError:
        return 0, None, None


def asked_during(ask_once: Callable[[], tuple], action: Callable[[], None]) -> list[tuple]:
    """The answers to requests sent one after another while ``action`` runs (and half a second on)."""
    answers, stop = [], threading.Event()

    def keep_asking() -> None:
        while not stop.is_set():
            answers.append(ask_once())

    asker = threading.Thread(target=keep_asking)
    asker.start()
    try:
        action()
        time.sleep(0.5)
    finally:
        stop.set()
        asker.join()
    return answers


def assert_switched_once(answers: list[tuple], old: str, new: str) -> None:
    """Every request answered; by the old version, then by the new one, never back."""
    assert {a[0] for a in answers} == {200}, "a request failed during the switch"
    served = [a[2] for a in answers]
    first_new = served.index(new)
    assert set(served[:first_new]) <= {old} and set(served[first_new:]) == {new}


@contextlib.contextmanager
def broken(model: str, version: int) -> Iterator[None]:
    """The registered TorchScript version's file made garbage (its server cannot load it), meanwhile."""
    from airflow_provider_dnntrain import tracking

    client = tracking.client(tracking.resolve_tracking_uri())
    source = urlsplit(client.get_model_version(model, str(version)).source).path
    model_file = Path(source) / "data" / "model" / "model.pt"
    kept = model_file.read_bytes()
    model_file.write_bytes(b"not TorchScript any more")
    try:
        yield
    finally:
        model_file.write_bytes(kept)


def assert_one_holder_at_a_time(first, second, endpoint: str) -> None:
    """Two servings' ``locked(endpoint)``: the second waits while the first holds it, then gets it."""
    taken = threading.Event()

    def take_second() -> None:
        with second.locked(endpoint):
            taken.set()

    with first.locked(endpoint):
        waiting = threading.Thread(target=take_second)
        waiting.start()
        assert not taken.wait(3), "the lock was taken twice"
    assert taken.wait(30)
    waiting.join()
