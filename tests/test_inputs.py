"""Datasets by URI: resolved and fetched through Airflow's ObjectStoragePath into the host's cache, from a
real web server (tests/object_store.py) and from plain files."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from airflow_helpers import TEST_DAGS, load_dag, xcom
from object_store import ObjectStore, S3Store
from pydantic import ValidationError

from airflow_provider_dnntrain import inputs, tracking
from airflow_provider_dnntrain.inputs import InputUnavailable
from airflow_provider_dnntrain.launchers import LocalLauncher
from airflow_provider_dnntrain.spec import Input, TrainingJob

TRAIN = "a,b\n1,2\n"


@pytest.fixture
def store(tmp_path):
    root = tmp_path / "store"
    (root / "digits" / "images").mkdir(parents=True)
    (root / "digits" / "train.csv").write_text(TRAIN)
    (root / "digits" / "images" / "0.txt").write_text("zero")
    served = ObjectStore(root)
    yield served
    served.close()


def digits(uri: str, **fields) -> Input:
    return Input(name="digits", uri=uri, **fields)


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


def test_a_file_is_fetched_once_and_keeps_its_name(store, tmp_path):
    cache = tmp_path / "cache"
    resolved = inputs.resolve(digits(store.url("digits/train.csv")))
    entry, fetched = inputs.fetch(resolved, cache)
    assert fetched and (entry / "train.csv").read_text() == TRAIN
    assert cache.stat().st_mode & 0o777 == 0o700  # a private dataset stays the owner's
    again = inputs.resolve(digits(store.url("digits/train.csv")))
    assert again.key == resolved.key
    assert inputs.fetch(again, cache) == (entry, False)
    assert store.downloads("digits/train.csv") == 1


def test_a_changed_object_is_fetched_anew_under_another_key(store, tmp_path):
    cache = tmp_path / "cache"
    first, _ = inputs.fetch(inputs.resolve(digits(store.url("digits/train.csv"))), cache)
    (store.root / "digits" / "train.csv").write_text(TRAIN + "3,4\n")
    second, fetched = inputs.fetch(inputs.resolve(digits(store.url("digits/train.csv"))), cache)
    assert fetched and second != first
    assert (second / "train.csv").read_text() == TRAIN + "3,4\n"
    assert (first / "train.csv").read_text() == TRAIN  # a run still reading it keeps its version
    assert store.downloads("digits/train.csv") == 2


@pytest.mark.parametrize("where", ["http", "file"])
def test_a_folder_is_fetched_whole(store, tmp_path, where):
    uri = store.url("digits/") if where == "http" else (store.root / "digits").as_uri()
    entry, _ = inputs.fetch(inputs.resolve(digits(uri)), tmp_path / "cache")
    assert sorted(str(p.relative_to(entry)) for p in entry.rglob("*") if p.is_file()) == [
        "digits/images/0.txt",
        "digits/train.csv",
    ]
    assert (entry / "digits" / "images" / "0.txt").read_text() == "zero"


def test_a_web_folder_is_what_its_index_links_inside_it(store, tmp_path):
    (store.root / "outside.txt").write_text("not the input's")
    index = '<a href="../">../</a> <a href="train.csv">t</a> <a href="../outside.txt">o</a>'  # as nginx lists
    (store.root / "digits" / "index.html").write_text(index)
    entry, _ = inputs.fetch(inputs.resolve(digits(store.url("digits/"))), tmp_path / "cache")
    assert sorted(str(p.relative_to(entry)) for p in entry.rglob("*")) == ["digits", "digits/train.csv"]
    assert store.downloads("outside.txt") == 0


def test_an_s3_folder_comes_through_the_airflow_connection_keyed_by_its_etags(tmp_path, monkeypatch):
    s3 = S3Store()
    monkeypatch.setenv("AIRFLOW_CONN_S3_HERE", s3.connection())
    try:
        s3.put("digits/train.csv", TRAIN)
        s3.put("digits/images/0.txt", "zero")
        item, cache = digits(s3.uri("digits/"), conn_id="s3_here"), tmp_path / "cache"
        first = inputs.resolve(item)
        entry, fetched = inputs.fetch(first, cache)
        assert fetched and (entry / "digits" / "train.csv").read_text() == TRAIN
        assert (entry / "digits" / "images" / "0.txt").read_text() == "zero"
        assert inputs.fetch(inputs.resolve(item), cache) == (entry, False)
        s3.put("digits/train.csv", TRAIN + "3,4\n")
        changed, fetched = inputs.fetch(inputs.resolve(item), cache)
        assert fetched and changed != entry
        assert (changed / "digits" / "train.csv").read_text() == TRAIN + "3,4\n"
    finally:
        s3.close()


def test_two_tasks_needing_one_new_input_fetch_it_once(store, tmp_path):
    cache, barrier, results = tmp_path / "cache", threading.Barrier(4), []

    def fetch() -> None:
        resolved = inputs.resolve(digits(store.url("digits/train.csv")))
        barrier.wait()
        results.append(inputs.fetch(resolved, cache))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(fetched for _, fetched in results) == [False, False, False, True]
    assert len({entry for entry, _ in results}) == 1
    assert store.downloads("digits/train.csv") == 1


def test_a_missing_input_fails_naming_it_and_leaves_nothing(store, tmp_path):
    cache = tmp_path / "cache"
    with pytest.raises(InputUnavailable, match=r"inputs\.digits: http://127\.0\.0\.1:\d+/nope\.csv does not"):
        inputs.resolve(digits(store.url("nope.csv")))
    with pytest.raises(InputUnavailable, match=r"inputs\.digits: .*/digits/gone\.csv does not exist"):
        inputs.resolve(digits((store.root / "digits" / "gone.csv").as_uri()))
    resolved = inputs.resolve(digits(store.url("digits/train.csv")))
    (store.root / "digits" / "train.csv").unlink()  # gone between the listing and the download
    with pytest.raises(InputUnavailable, match=r"inputs\.digits: fetching http://.*/train\.csv failed"):
        inputs.fetch(resolved, cache)
    assert [name for name in entries(cache) if not name.endswith(".lock")] == []


def test_credentials_come_from_the_airflow_connection_and_stay_out_of_messages(tmp_path, monkeypatch):
    (tmp_path / "private").mkdir()
    (tmp_path / "private" / "train.csv").write_text(TRAIN)
    store = ObjectStore(tmp_path, credentials=("reader", "s3cr3t-pw"))
    try:
        with pytest.raises(InputUnavailable, match=r"csv does not exist, or cannot be read with no conn"):
            inputs.resolve(digits(store.url("private/train.csv")))
        reader = {"conn_type": "http", "host": "127.0.0.1", "login": "reader", "password": "s3cr3t-pw"}
        monkeypatch.setenv("AIRFLOW_CONN_STORE_READER", json.dumps({**reader, "port": store.port}))
        entry, _ = inputs.fetch(
            inputs.resolve(digits(store.url("private/train.csv"), conn_id="store_reader")), tmp_path / "cache"
        )
        assert (entry / "train.csv").read_text() == TRAIN
        in_url = store.url("private/nope.csv").replace("http://", "http://reader:s3cr3t-pw@")
        with pytest.raises(InputUnavailable) as raised:
            inputs.resolve(digits(in_url))
        assert "s3cr3t-pw" not in str(raised.value) and "***@127.0.0.1" in str(raised.value)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("connection", "uri", "refusal"),
    [
        (
            {"host": "127.0.0.1", "port": 8080},
            "http://anyone.example/x.csv",
            "is for http(s)://127.0.0.1:8080",
        ),
        ({"host": "127.0.0.1", "port": 8080}, "http://127.0.0.1:9999/x.csv", "its credentials are not sent"),
        ({"host": "https://data.example"}, "http://data.example/x.csv", "is for https://data.example:443"),
        ({"host": "data.example", "schema": "https"}, "http://data.example/x.csv", "is for https://"),
        ({}, "http://127.0.0.1:8080/x.csv", "'web' names no host"),
        ({"host": "data.example"}, "https://data.example/x.csv", None),
        ({"host": "DATA.example", "schema": "https"}, "https://data.example:443/x.csv", None),
        ({"host": "https://data.example:8443"}, "https://reader@data.example:8443/x.csv", None),
    ],
)
def test_credentials_go_only_to_their_connections_server(monkeypatch, connection, uri, refusal):
    secret = {"conn_type": "http", "login": "reader", "password": "s3cr3t-pw", **connection}
    monkeypatch.setenv("AIRFLOW_CONN_WEB", json.dumps(secret))
    item = digits(uri, conn_id="web")
    if refusal is None:
        inputs.check_destination(item)
        return
    with pytest.raises(ValueError, match=r"^inputs\.digits: connection 'web' ") as raised:
        inputs.check_destination(item)
    assert refusal in str(raised.value) and "s3cr3t-pw" not in str(raised.value)


def test_a_connection_without_credentials_goes_anywhere(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_PUBLIC", json.dumps({"conn_type": "http", "host": "mirror.example"}))
    inputs.check_destination(digits("http://elsewhere.example/x.csv", conn_id="public"))


def test_modes_and_uris_are_checked_when_the_job_is_made():
    assert digits("s3://bucket/digits").downloads
    shared = Input(name="d", uri="file:///mnt/shared/digits", mode="mount")
    assert shared.replica_path() == "/mnt/shared/digits"
    assert Input(name="d", path="/mnt/d").replica_path() == "/mnt/d"
    with pytest.raises(ValidationError, match=r"inputs\.digits\.mode: 'mount' passes a path as is.*s3://"):
        digits("s3://bucket/digits", mode="mount")
    with pytest.raises(ValidationError, match=r"inputs\.digits\.uri: '/data/digits' is not a URI to"):
        digits("/data/digits")
    with pytest.raises(ValidationError, match=r"inputs\.digits\.uri: 'http://h/x/\.\.' must end with a name"):
        digits("http://h/x/..")
    with pytest.raises(ValidationError, match=r"inputs\.digits: give a uri"):
        Input(name="digits")
    with pytest.raises(ValidationError, match=r"inputs\.digits\.uri: 'pvc:///x' names no claim"):
        digits("pvc:///x", mode="mount")
    claimed = TrainingJob(
        framework="pytorch",
        source_directory="src",
        entry_script="train.py",
        inputs=[digits("pvc://datasets/digits", mode="mount")],
    )
    with pytest.raises(
        ValueError, match=r"inputs\.digits\.uri: pvc:// names a Kubernetes volume claim; the loc"
    ):
        LocalLauncher().validate(claimed)


def test_a_training_task_reads_its_inputs_from_the_hosts_cache(store, airflow_db):
    dag = load_dag(TEST_DAGS, "dnntrain_test_downloaded_inputs")
    conf = {"uri": store.url("digits/train.csv"), "labels": (store.root / "digits" / "images").as_uri()}
    read = []
    for _ in range(2):
        dag_run = dag.test(run_conf=conf)
        assert dag_run.state == "success"
        read.append(json.loads((Path(xcom(dag_run, "train")["outputs"]) / "inputs.json").read_text()))
    found = read[0]["inputs"]
    assert found["digits"]["files"] == {"train.csv": TRAIN}
    assert found["digits"]["path"].endswith("/inputs/digits/train.csv")
    assert read[0]["argv"] == ["--data-folder", found["digits"]["path"]]
    assert found["labels"] == {"path": str(store.root / "digits" / "images"), "files": {"0.txt": "zero"}}
    assert read[1]["inputs"]["digits"]["files"] == {"train.csv": TRAIN}
    assert store.downloads("digits/train.csv") == 1  # the second run found it in the cache
    cached = Path(found["digits"]["path"]).resolve()
    assert cached.is_relative_to(inputs.default_cache_root().resolve())
    client = tracking.client(tracking.resolve_tracking_uri())
    params = client.get_run(xcom(dag_run, "train")["tracking_run_id"]).data.params
    assert params["inputs.digits"] == conf["uri"] and params["inputs.labels"] == conf["labels"]
