"""What a downloaded input costs: its first fetch, and a later run's check that the cache holds it.

Not part of the test suite. A folder of files (``--files`` × ``--megabytes``) served by a local web
server (tests/object_store.py: ETags, index pages), measured against a direct download of the same files
with the standard library on the same run:

- the first fetch into an empty cache (listing, versions, download, rename into place);
- a later run's resolve + fetch of the unchanged input (the listing and versions only: nothing is
  downloaded), as a ratio to the direct download.

The server runs in a process of its own, as a store would.

Run: .venv/bin/python benchmarks/inputs.py [--files 20 --megabytes 5 --repeats 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed(action) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def wait_for_server(url: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(url).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--megabytes", type=int, default=5, help="per file")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    from airflow_provider_dnntrain import inputs
    from airflow_provider_dnntrain.backends.common.ports import free_port
    from airflow_provider_dnntrain.spec import Input

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        (root / "store" / "data").mkdir(parents=True)
        names = [f"part-{i:03d}.bin" for i in range(args.files)]
        for name in names:
            (root / "store" / "data" / name).write_bytes(os.urandom(args.megabytes << 20))
        port = free_port("127.0.0.1", taken=set())
        serve = (
            "import sys, time; from object_store import ObjectStore; "
            f"ObjectStore(sys.argv[1], port={port}); time.sleep(1e9)"
        )
        server = subprocess.Popen([sys.executable, "-c", serve, str(root / "store")], cwd=REPO / "tests")
        url = f"http://127.0.0.1:{port}/data/"
        item = Input(name="data", uri=url)
        try:
            wait_for_server(url)

            def direct() -> None:
                target = root / "direct"
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir()
                for name in names:
                    with urllib.request.urlopen(url + name) as response:
                        (target / name).write_bytes(response.read())

            def first_fetch() -> None:
                shutil.rmtree(root / "cache", ignore_errors=True)
                inputs.fetch(inputs.resolve(item), root / "cache")

            def cached() -> None:
                assert inputs.fetch(inputs.resolve(item), root / "cache")[1] is False

            runs = {"direct download": [], "first fetch": [], "cached (a later run)": []}
            for _ in range(args.repeats):
                runs["direct download"].append(timed(direct))
                runs["first fetch"].append(timed(first_fetch))
                runs["cached (a later run)"].append(timed(cached))
        finally:
            server.kill()
            server.wait()
    size = args.files * args.megabytes
    print(f"{args.files} files, {size} MB, median of {args.repeats}:")
    medians = {name: statistics.median(times) for name, times in runs.items()}
    for name, median in medians.items():
        print(f"{name}: {median * 1000:.1f} ms (ratio to direct {median / medians['direct download']:.3f})")


if __name__ == "__main__":
    main()
