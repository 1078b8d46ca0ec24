"""A Kubernetes job whose environment has packages: its image built by a real Docker daemon, pushed to
a real registry with credentials, and pulled from there by the fake cluster's kubelet with the pod's
pull secret (without it, the pull is refused and the run fails at once, saying why). The fake kubelet
runs the project's virtualenv, not the image: that the image holds the package is proven by the
Docker tests (tests/backends/docker/test_images.py)."""

from __future__ import annotations

import base64
import contextlib

import pytest
from docker_daemon import TORCH_IMAGE
from fake_kubernetes import NAMESPACE, assert_nothing_left, fake_launcher
from launcher_jobs import run_job

from airflow_provider_dnntrain.backends.base import JobFailed
from airflow_provider_dnntrain.spec import Environment, TrainingJob

SCRIPT = 'import os; print("ran on", os.environ["DNNTRAIN_POD_REPLICA"], flush=True)\n'


@contextlib.contextmanager
def pull_secret(core, registry):
    """A ``kubernetes.io/dockerconfigjson`` Secret with the registry's credentials, while it lasts."""
    from kubernetes import client

    config = base64.b64encode(registry.docker_config_json().encode()).decode()
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(name="registry-pull"), type="kubernetes.io/dockerconfigjson",
        data={".dockerconfigjson": config},
    )  # fmt: skip
    core.create_namespaced_secret(NAMESPACE, secret)
    try:
        yield "registry-pull"
    finally:
        core.delete_namespaced_secret("registry-pull", NAMESPACE)


def test_pods_run_on_the_environment_image_the_task_built_and_pushed(
    cluster, docker_daemon, docker_registry, registry_connection, monkeypatch, tmp_path
):
    (tmp_path / "job.py").write_text(SCRIPT)
    job = TrainingJob(
        framework="pytorch", source_directory=str(tmp_path), entry_script="job.py",
        environment=Environment(image=TORCH_IMAGE, pip_packages=["pyjokes==0.8.3"]),
    )  # fmt: skip
    options = {"docker_url": docker_daemon.base_url, "docker_conn_id": registry_connection}
    without_secret = fake_launcher(cluster, monkeypatch, tmp_path / "runs", **options)
    image = without_secret.pods.image(job)
    with pull_secret(without_secret.core, docker_registry) as secret:
        launcher = fake_launcher(cluster, monkeypatch, tmp_path / "ok", image_pull_secrets=secret, **options)
        handle, lines = run_job(launcher, job, "k8s-env")
    assert docker_registry.has(image)
    assert any("ran on worker-0" in line.text for line in lines)
    assert docker_registry.manifest_reads(image) >= 1  # the kubelet's pull, with the pull secret
    assert_nothing_left(cluster)

    with pytest.raises(JobFailed, match=r"ErrImagePull.*401 Unauthorized"):
        run_job(without_secret, job, "k8s-env-no-secret", timeout=60)
    assert_nothing_left(cluster)
