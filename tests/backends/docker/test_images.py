"""Environments built into images on the real daemon and pushed to a real registry with credentials
(tests/docker_registry.py): built once however many runs ask at once, reused by the next run without
building, the package there for the script; a failed build names the package, leaves no image and no
lock, and a lock whose builder died is taken over."""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from docker_daemon import TORCH_IMAGE
from launcher_jobs import run_job

from airflow_provider_dnntrain.backends.common import docker_lock
from airflow_provider_dnntrain.backends.common import environment_images as images
from airflow_provider_dnntrain.backends.common.environments import EnvironmentBuildFailed
from airflow_provider_dnntrain.backends.docker.launcher import DockerLauncher
from airflow_provider_dnntrain.spec import Environment, TrainingJob

PACKAGE = "pyjokes==0.8.3"  # pure Python, small, not in the training image
SCRIPT = """
import importlib.metadata, os, pyjokes
version = importlib.metadata.version("pyjokes")
print("pyjokes", version, "for", os.environ["DNNTRAIN_POD_REPLICA"], flush=True)
os.makedirs("outputs", exist_ok=True)
open("outputs/version.txt", "w").write(version)
"""


def environment_job(source, packages: list[str]) -> TrainingJob:
    (source / "uses_package.py").write_text(SCRIPT)
    return TrainingJob(
        framework="pytorch",
        source_directory=str(source),
        entry_script="uses_package.py",
        environment=Environment(pip_packages=packages),
    )


def test_an_environment_is_built_once_pushed_and_reused_by_the_next_run(
    daemon, docker_registry, registry_connection, tmp_path, caplog
):
    job = environment_job(tmp_path, [PACKAGE])
    building = images.ImageBuilding(daemon.base_url, docker_conn_id=registry_connection)
    tag = building.tag(job, TORCH_IMAGE, "python")
    daemon.docker("rmi", "-f", tag, check=False)  # the daemon's and the registry's storage are kept
    docker_registry.delete(tag)
    with ThreadPoolExecutor(2) as pool:  # two tasks asking for the same new environment at once
        results = list(pool.map(lambda _: building.ensure(job, TORCH_IMAGE, "python"), range(2)))
    assert sorted(r.built for r in results) == [False, True]
    assert tag.startswith(f"{docker_registry.address}/dnntrain-env:") and {r.tag for r in results} == {tag}
    assert docker_registry.has(tag)
    assert "pyjokes==0.8.3" in results[0].freeze
    image_id = daemon.docker("image", "inspect", "-f", "{{.Id}}", tag).stdout

    launcher = DockerLauncher(
        docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=str(tmp_path / "runs"),
        docker_conn_id=registry_connection, stop_grace_seconds=2,
    )  # fmt: skip
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=images.__name__):
        handle, lines = run_job(launcher, job, "docker-env")
    assert f"Environment image {tag} (cached)" in caplog.text and "[build]" not in caplog.text
    assert daemon.docker("image", "inspect", "-f", "{{.Id}}", tag).stdout == image_id  # not built again
    assert any(line.text.startswith("pyjokes 0.8.3 for worker-0") for line in lines)
    artifacts = launcher.collect_outputs(handle)
    assert (artifacts / "outputs" / "version.txt").read_text() == "0.8.3"
    assert "pyjokes==0.8.3" in (artifacts / "logs" / "environment.txt").read_text()
    assert docker_registry.password not in caplog.text


def test_a_failed_build_names_the_package_leaves_no_image_and_a_dead_builder_s_lock_is_taken(
    daemon, tmp_path, caplog
):
    job = environment_job(tmp_path, ["dnntrain-no-such-package==1.0"])
    tag = images.environment_tag(job, TORCH_IMAGE, "python", None)
    lock = f"dnntrain-build-{tag.rsplit(':', 1)[1]}"
    # A builder that died two minutes ago: its lock is there, its lease long lapsed.
    daemon.docker("create", "--name", lock, "--label", f"{docker_lock.LEASE_LABEL}={time.time() - 120}",
                  TORCH_IMAGE, "true")  # fmt: skip
    launcher = DockerLauncher(docker_url=daemon.base_url, image=TORCH_IMAGE, work_root=str(tmp_path / "runs"))
    with (
        caplog.at_level(logging.INFO, logger=images.__name__),
        pytest.raises(EnvironmentBuildFailed) as failed,
    ):
        launcher.submit(job, launcher.plan(job, "docker-env-fails"), extra_env={})
    message = str(failed.value)
    assert message.startswith(f"environment.pip_packages: building {tag} on {TORCH_IMAGE} failed")
    assert "No matching distribution found for dnntrain-no-such-package==1.0" in message
    assert "its holder is gone" in caplog.text
    assert not daemon.has_image(tag)  # nothing half-built to be used
    assert daemon.docker("ps", "-a", "-q", "--filter", f"name={lock}").stdout.strip() == ""
    assert daemon.held("docker-env-fails") == ([], [])


def test_a_base_image_from_conf_cannot_add_build_steps(tmp_path):
    hostile = Environment(image="dnntrain-torch:cpu\nRUN touch /pwned", pip_packages=[PACKAGE])
    job = environment_job(tmp_path, [PACKAGE]).model_copy(update={"environment": hostile})
    with pytest.raises(ValueError, match=r"^environment.image: .* is not an image reference"):
        images.EnvironmentImages(None, None, "python").ensure(job, hostile.image)  # before any daemon
