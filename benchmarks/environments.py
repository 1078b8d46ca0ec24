"""What a job's environment (``environment.pip_packages``) costs: its first build, and its reuse.

Not part of the test suite. For one small extra package (``pyjokes==0.8.3``, from the package index;
uv's own download cache cleared first, so the first build downloads it), on the local launcher:

- the first build of the environment, then its cached reuse by a later run (the same content);
- a one-replica job run directly (``python uses_package.py`` in the built environment) against the
  same job through the local launcher with that cached environment, and with none (the built
  environment's interpreter named as ``environment.python``): the launcher's cost of the cached
  environment is the difference of those two, as a ratio to the direct run.

Run: .venv/bin/python benchmarks/environments.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "tests" / "scripts"
PACKAGE = "pyjokes==0.8.3"


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from airflow_provider_dnntrain.backends.base import wait_for_job
    from airflow_provider_dnntrain.backends.common.environments import ensure_environment
    from airflow_provider_dnntrain.launchers import LocalLauncher
    from airflow_provider_dnntrain.spec import TrainingJob

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        uv_cache = root / "uv-cache"  # a cold download cache, this benchmark's own
        env = {"UV_CACHE_DIR": str(uv_cache)}

        def build() -> dict:
            return ensure_environment(str(root / "envs"), sys.executable, [PACKAGE], "", env)

        first = timed(build)
        reuse = statistics.median(timed(build) for _ in range(args.repeats))
        python = build()["python"]
        print(f"first build: {first:.2f} s; cached reuse: {reuse * 1000:.3f} ms (ratio {reuse / first:.6f})")

        def direct() -> None:
            subprocess.run([python, "uses_package.py"], cwd=SCRIPTS, check=True, capture_output=True)

        def through_launcher(with_environment: bool) -> None:
            environment = {"pip_packages": [PACKAGE]} if with_environment else {"python": python}
            job = TrainingJob(
                framework="pytorch",
                source_directory=str(SCRIPTS),
                entry_script="uses_package.py",
                environment=environment,
            )
            launcher = LocalLauncher(work_root=str(root / "runs"), environments_root=str(root / "envs"))
            handle = launcher.submit(job, launcher.plan(job, "bench-env"), extra_env={})
            wait_for_job(launcher, handle, lambda line: None, timeout=120)

        runs = {"direct": [], "launcher, cached environment": [], "launcher, no environment": []}
        for _ in range(args.repeats):
            runs["direct"].append(timed(direct))
            runs["launcher, cached environment"].append(timed(lambda: through_launcher(True)))
            runs["launcher, no environment"].append(timed(lambda: through_launcher(False)))
        medians = {name: statistics.median(times) for name, times in runs.items()}
        for name, median in medians.items():
            print(f"{name}: {median:.3f} s (ratio to direct {median / medians['direct']:.2f})")
        extra = medians["launcher, cached environment"] - medians["launcher, no environment"]
        share = extra / medians["direct"]
        print(f"the cached environment's cost per run: {extra * 1000:.0f} ms ({share:.2f} of direct)")


if __name__ == "__main__":
    main()
