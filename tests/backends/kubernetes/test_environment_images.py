"""A Kubernetes job whose environment has packages: its image built by a real Docker daemon, pushed to
a real registry with credentials, and pulled from there by the fake cluster's kubelet with the run's
pull secret (without one, the pull is refused and the run fails at once, saying why). The fake kubelet
runs the project's virtualenv, not the image: that the image holds the package is proven by the
Docker tests (tests/backends/docker/test_images.py)."""

from __future__ import annotations

import json

import pytest
from docker_daemon import TORCH_IMAGE
from fake_kubernetes import assert_nothing_left, fake_launcher
from launcher_jobs import run_job

from airflow_provider_dnntrain.backends.base import JobFailed
from airflow_provider_dnntrain.spec import Environment, TrainingJob

SCRIPT = 'import os; print("ran on", os.environ["DNNTRAIN_POD_REPLICA"], flush=True)\n'


def test_pods_run_on_the_environment_image_the_task_built_and_pushed(
    cluster, docker_daemon, docker_registry, registry_connection, monkeypatch, tmp_path
):
    """Given the docker connection alone, the run pulls with a Secret of its own that holds the
    connection's credentials, gone with the run; the password is in no preview."""
    (tmp_path / "job.py").write_text(SCRIPT)
    job = TrainingJob(
        framework="pytorch", source_directory=str(tmp_path), entry_script="job.py",
        environment=Environment(image=TORCH_IMAGE, pip_packages=["pyjokes==0.8.3"]),
    )  # fmt: skip
    options = {"docker_url": docker_daemon.base_url, "docker_conn_id": registry_connection}
    launcher = fake_launcher(cluster, monkeypatch, tmp_path / "runs", **options)
    image = launcher.pods.image(job)
    preview = json.dumps(launcher.preview_objects(job, "k8s-env"))
    assert docker_registry.password not in preview and '".dockerconfigjson": "***"' in preview
    handle, lines = run_job(launcher, job, "k8s-env")
    assert docker_registry.has(image)
    assert any("ran on worker-0" in line.text for line in lines)
    assert docker_registry.manifest_reads(image) >= 1  # the kubelet's pull, with the run's pull secret
    pod_spec = handle.pod_manifests[0]["spec"]
    assert pod_spec["imagePullSecrets"] == [{"name": f"{handle.run.job}-pull"}]
    assert_nothing_left(cluster)

    # A private image named without a pull secret: the kubelet's pull is refused, and the run fails at once.
    without_secret = fake_launcher(cluster, monkeypatch, tmp_path / "no-secret", image=image)
    plain = job.model_copy(update={"environment": Environment()})
    with pytest.raises(JobFailed, match=r"ErrImagePull.*401 Unauthorized"):
        run_job(without_secret, plain, "k8s-env-no-secret", timeout=60)
    assert_nothing_left(cluster)
