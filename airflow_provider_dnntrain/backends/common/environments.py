"""A job's Python environment on a host: the base interpreter's packages (the framework, MLflow) plus
the job's ``pip_packages`` and requirements, in a virtual environment built with ``uv`` on first use.

Environments are cached per host under a key hashed from what they hold (base interpreter, packages,
requirements), and reused by every later run that asks for the same. Two tasks that need the same new
environment at once build it once: the second waits on the first's lock, then finds it built. An
environment is built in a scratch folder and renamed into place whole, so a half-built one is never
used; a failed build leaves nothing and raises with the resolver's own message. The resolved package
set (``uv pip freeze``) is kept beside it, for the run's tracking.

Standard library only: the SSH launcher ships this file to its hosts and builds there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from airflow_provider_dnntrain.spec import TrainingJob

try:
    from airflow_provider_dnntrain.backends.common.host_cache import make_once
except ImportError:  # run as a script on an SSH host (isolated, no packages), beside host_cache.py
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from host_cache import make_once

FREEZE = "dnntrain-freeze.txt"  # the resolved package set, in the environment's folder
BUILD_TIMEOUT_SECONDS = 1800


class EnvironmentBuildFailed(RuntimeError):
    pass


def requirements_of(job: TrainingJob) -> str:
    """The text of the job's requirements file ('' without one); ``ValueError`` naming the field."""
    name = job.environment.requirements_file
    if not name:
        return ""
    path = Path(job.source_directory).expanduser().resolve() / name
    if not path.is_file():
        raise ValueError(f"environment.requirements_file: {str(path)!r} is not a file")
    return path.read_text()


def environment_key(base_python: str, packages: list[str], requirements: str) -> str:
    content = json.dumps({"python": base_python, "packages": sorted(packages), "requirements": requirements})
    return hashlib.sha256(content.encode()).hexdigest()[:20]


def environment_python(root: str, key: str) -> str:
    return os.path.join(root, key, "bin", "python")


def find_uv(base_python: str) -> str | None:
    """``uv`` beside the base interpreter (a venv that has it installed), else on the PATH."""
    beside = os.path.join(os.path.dirname(base_python), "uv")
    return beside if os.access(beside, os.X_OK) else shutil.which("uv")


def ensure_environment(
    root: str, base_python: str, packages: list[str], requirements: str, uv_settings: dict | None = None
) -> dict:
    """The environment's interpreter, built if it is not there yet: ``{"python", "key", "built",
    "freeze"}``. ``uv_settings``: ``UV_*`` variables the build runs with (an index, local wheels,
    offline). ``EnvironmentBuildFailed`` says what could not be installed and why."""
    key = environment_key(base_python, packages, requirements)
    built = make_once(
        root, key, lambda scratch: _build(scratch, base_python, packages, requirements, uv_settings or {})
    )
    return _built(root, key, built=built)


def _built(root: str, key: str, built: bool) -> dict:
    with open(os.path.join(root, key, FREEZE)) as freeze:
        return {"python": environment_python(root, key), "key": key, "built": built, "freeze": freeze.read()}


def _build(folder: str, base_python: str, packages: list[str], requirements: str, uv_settings: dict) -> None:
    uv = find_uv(base_python)
    if uv is None:
        raise EnvironmentBuildFailed(
            f"environment.pip_packages: uv is not installed beside {base_python} nor on the PATH "
            "(pip install uv), or give an interpreter that has the packages (environment.python)"
        )
    _run([uv, "venv", "--quiet", "--relocatable", "--python", base_python, folder])
    python = os.path.join(folder, "bin", "python")
    _see_base_packages(base_python, python)
    install = [uv, "pip", "install", "--quiet", "--python", python, *packages]
    if requirements:
        listing = os.path.join(folder, "dnntrain-requirements.txt")
        with open(listing, "w") as handle:
            handle.write(requirements)
        install += ["--requirement", listing]
    _run(
        install,
        what=" ".join([*packages, *(["-r requirements_file"] if requirements else [])]),
        env=uv_settings,
    )
    freeze = _run([uv, "pip", "freeze", "--python", python, "--exclude-editable"])
    with open(os.path.join(folder, FREEZE), "w") as handle:  # last: its presence means complete
        handle.write(freeze)


def _see_base_packages(base_python: str, python: str) -> None:
    """The base's packages (the framework, MLflow) stay visible, after the environment's own: a ``.pth``
    naming the base's site folders (``--system-site-packages`` would reach only the interpreter a base
    virtual environment was itself made from)."""
    where = (
        "import json, site, sysconfig; "
        "print(json.dumps([*site.getsitepackages(), sysconfig.get_paths()['purelib']]))"
    )
    base_sites = json.loads(_run([base_python, "-c", where]))
    own = json.loads(_run([python, "-c", where]))[-1]
    with open(os.path.join(own, "_dnntrain_base.pth"), "w") as pth:
        pth.write("".join(f"{site}\n" for site in dict.fromkeys(base_sites) if site != own))


def _run(argv: list[str], what: str = "", env: dict | None = None) -> str:
    env = {**os.environ, **(env or {}), "UV_NO_PROGRESS": "1"}
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=BUILD_TIMEOUT_SECONDS, env=env)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise EnvironmentBuildFailed(f"environment: {argv[1:3]}: {error}") from None
    if done.returncode != 0:
        message = (done.stderr or done.stdout).strip()[-4000:]
        if what:
            raise EnvironmentBuildFailed(f"environment.pip_packages: installing {what} failed:\n{message}")
        raise EnvironmentBuildFailed(f"environment: {' '.join(argv[1:3])} failed:\n{message}")
    return done.stdout


def main() -> None:
    """``python environments.py ROOT SPEC``, SPEC a JSON ``{"python", "packages", "requirements"}``: build
    (or find) the environment and print what :func:`ensure_environment` returns, as JSON (the SSH
    launcher's way of building on a host)."""
    spec = json.loads(sys.argv[2])
    try:
        result = ensure_environment(
            sys.argv[1], spec["python"], spec["packages"], spec["requirements"], spec.get("uv_settings")
        )
    except EnvironmentBuildFailed as error:
        result = {"error": str(error)}
    with contextlib.suppress(BrokenPipeError):
        print(json.dumps(result))


if __name__ == "__main__":
    main()
