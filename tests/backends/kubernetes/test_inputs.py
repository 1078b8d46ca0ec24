"""A run's inputs in its pods: the manifests (validated against the API's schemas), real runs on the
fake cluster fetching from a web server both the worker and the pods reach, and volume claims."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from backends.kubernetes.test_manifests import validate_all
from fake_kubernetes import NAMESPACE, assert_nothing_left, fake_launcher
from launcher_jobs import run_job as run
from object_store import ObjectStore, S3Store

from airflow_provider_dnntrain.backends.common import bootstrap as kubernetes_bootstrap
from airflow_provider_dnntrain.backends.kubernetes.launcher import KubernetesLauncher
from airflow_provider_dnntrain.spec import Horovod, Input, MultiWorkerMirrored, TrainingJob

TEST_SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
TRAIN = "a,b\n1,2\n"


def reading(*inputs: Input, distribution=None) -> TrainingJob:
    return TrainingJob(
        framework="tensorflow",
        source_directory=str(TEST_SCRIPTS),
        entry_script="reads_inputs.py",
        distribution=distribution or MultiWorkerMirrored(worker_count=2),
        inputs=list(inputs),
    )


def found_by(lines) -> dict[str, dict]:
    prefix = "inputs: "
    return {
        line.replica: json.loads(line.text[len(prefix) :]) for line in lines if line.text.startswith(prefix)
    }


# -- manifests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kubeflow", [False, True], ids=["pods", "kubeflow"])
def test_inputs_become_volumes_every_bootstrapping_container_mounts(kubeflow):
    job = reading(
        Input(name="digits", uri="s3://datasets/digits/", argument="--data-folder"),
        Input(name="labels", uri="pvc://datasets/labels/v2", mode="mount"),
        distribution=Horovod(node_count=2, runner="mpirun", controller="mpi") if kubeflow else None,
    )
    launcher = KubernetesLauncher(
        kubernetes_conn_id=None, namespace="ml", kubeflow=kubeflow, inputs_cache_claim="dnntrain-inputs"
    )
    plan = launcher.preview(job, "inputs-run")
    env = plan.replicas[0].env
    assert env["DNNTRAIN_INPUT_DIGITS"] == "/dnntrain/run/inputs/digits/digits"
    assert env["DNNTRAIN_INPUT_LABELS"] == "/dnntrain/claims/datasets/labels/v2"
    objects = launcher.preview_objects(job, "inputs-run")
    validate_all([o for o in objects if o["apiVersion"] == "v1"])
    (secret,) = [o for o in objects if o["kind"] == "Secret"]
    assert secret["data"]["inputs.json"] == "***"
    if kubeflow:
        (mpijob,) = [o for o in objects if o["kind"] == "MPIJob"]
        specs = [r["template"]["spec"] for r in mpijob["spec"]["mpiReplicaSpecs"].values()]
    else:
        specs = [o["spec"] for o in objects if o["kind"] == "Pod"]
    for spec in specs:
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["dnntrain-inputs-cache"]["persistentVolumeClaim"] == {"claimName": "dnntrain-inputs"}
        assert volumes["dnntrain-input-sources"]["secret"]["items"] == [
            {"key": "inputs.json", "path": "inputs.json"}
        ]
        assert volumes["dnntrain-claim-0"]["persistentVolumeClaim"] == {
            "claimName": "datasets",
            "readOnly": True,
        }
        bootstrapping = [
            c for c in [*spec["containers"], *spec.get("initContainers", [])] if c["name"] != "outputs"
        ]
        for container in bootstrapping:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts["dnntrain-inputs-cache"] == "/dnntrain/inputs-cache", container["name"]
            assert mounts["dnntrain-input-sources"] == "/dnntrain/input-sources"
            assert mounts["dnntrain-claim-0"] == "/dnntrain/claims/datasets"


def test_a_file_on_the_workers_disk_is_refused_when_the_job_is_planned(tmp_path):
    launcher = KubernetesLauncher(kubernetes_conn_id=None, namespace="ml")
    job = reading(Input(name="digits", uri=(tmp_path / "digits").as_uri()))
    with pytest.raises(ValueError, match=r"inputs\.digits\.uri: file://.* is on the Airflow worker's disk"):
        launcher.preview(job, "inputs-run")


def test_a_pod_that_cannot_fetch_an_input_says_which_without_the_signature(tmp_path):
    store = ObjectStore(tmp_path)
    try:
        source = {
            "name": "digits",
            "leaf": "x.csv",
            "headers": {},
            "files": [["", store.url("x.csv?X-Signature=abc")]],
        }
        with pytest.raises(OSError) as failed:
            kubernetes_bootstrap._download(source, str(tmp_path / "scratch"))
    finally:
        store.close()
    assert str(failed.value).startswith(f"{store.url('x.csv')}: HTTP Error 404")
    assert "abc" not in str(failed.value)


# -- runs on the fake cluster ----------------------------------------------------------------------------


@pytest.mark.slow
def test_pods_fetch_their_inputs_once_into_the_shared_cache_and_read_claims(cluster, monkeypatch, tmp_path):
    (tmp_path / "store" / "digits" / "images").mkdir(parents=True)
    (tmp_path / "store" / "digits" / "train.csv").write_text(TRAIN)
    (tmp_path / "store" / "digits" / "images" / "0.txt").write_text("zero")
    labels = cluster.root / "volumes" / NAMESPACE / "datasets" / "labels"  # the claim's volume
    labels.mkdir(parents=True)
    (labels / "names.txt").write_text("cat\n")
    launcher = fake_launcher(cluster, monkeypatch, tmp_path, inputs_cache_claim="dnntrain-inputs")
    with cluster.shared_address() as (address, port):
        store = ObjectStore(tmp_path / "store", bind="0.0.0.0", port=port)
        try:
            job = reading(
                Input(name="digits", uri=store.url("digits/", host=address), argument="--data-folder"),
                Input(name="labels", uri="pvc://datasets/labels", mode="mount"),
            )
            runs = [run(launcher, job, f"k8s-inputs-{attempt}")[1] for attempt in range(2)]
        finally:
            store.close()
    for attempt, lines in enumerate(runs):
        found = found_by(lines)
        assert sorted(found) == ["worker-0", "worker-1"]
        for seen in found.values():
            assert seen["digits"] == {
                "path": "/dnntrain/run/inputs/digits/digits",
                "files": {"images/0.txt": "zero", "train.csv": TRAIN},
            }
            assert seen["labels"] == {
                "path": "/dnntrain/claims/datasets/labels",
                "files": {"names.txt": "cat\n"},
            }
        said = sorted(line.text for line in lines if line.text.startswith("dnntrain: input "))
        if attempt == 1:  # both pods found it in the claim the first run filled
            assert said == ["dnntrain: input digits: cached"] * 2
        else:
            assert len(said) == 2 and sum("fetched in" in text for text in said) == 1
    assert store.downloads("digits/train.csv") == 1  # one pod of the first run fetched it, for every pod
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_without_a_cache_claim_each_pod_fetches_into_its_own_volume(cluster, monkeypatch, tmp_path):
    (tmp_path / "store").mkdir()
    (tmp_path / "store" / "train.csv").write_text(TRAIN)
    launcher = fake_launcher(cluster, monkeypatch, tmp_path)
    with cluster.shared_address() as (address, port):
        store = ObjectStore(tmp_path / "store", bind="0.0.0.0", port=port)
        try:
            job = reading(Input(name="digits", uri=store.url("train.csv", host=address)))
            _, lines = run(launcher, job, "k8s-inputs-own")
        finally:
            store.close()
    for seen in found_by(lines).values():
        assert seen["digits"] == {
            "path": "/dnntrain/run/inputs/digits/train.csv",
            "files": {"train.csv": TRAIN},
        }
    assert store.downloads("train.csv") == 2
    assert_nothing_left(cluster)


@pytest.mark.slow
def test_pods_fetch_from_s3_by_the_urls_the_worker_signed(cluster, monkeypatch, tmp_path):
    launcher = fake_launcher(cluster, monkeypatch, tmp_path)
    with cluster.shared_address() as (address, port):
        s3 = S3Store(bind="0.0.0.0", port=port, address=address)
        monkeypatch.setenv("AIRFLOW_CONN_S3_FOR_PODS", s3.connection())
        try:
            s3.put("digits/train.csv", TRAIN)
            job = reading(Input(name="digits", uri=s3.uri("digits/"), conn_id="s3_for_pods"))
            handle, lines = run(launcher, job, "k8s-inputs-s3")
        finally:
            s3.close()
    for seen in found_by(lines).values():
        assert seen["digits"] == {"path": "/dnntrain/run/inputs/digits/digits", "files": {"train.csv": TRAIN}}
    logged = "\n".join(map(str, lines)) + handle.plan.to_json()
    assert "Signature=" not in logged and "test-secret" not in logged  # signed URLs stay in the Secret
    assert_nothing_left(cluster)  # which went with the run
