"""A per-host cache of folders made once and shared by every later run: jobs' environments, downloaded
inputs.

An entry ``<root>/<key>`` is made in a scratch folder and renamed into place whole, so a half-made one
is never used; two processes that need the same new entry at once make it once (the second waits on
the first's lock, then finds it there); a failed attempt leaves nothing.

Standard library only: the SSH launcher ships this file to its hosts. ``python host_cache.py missing
ROOT KEY...`` prints (JSON) the keys that have no entry; ``python host_cache.py unpack ROOT KEY TAR``
makes the entry from a tar (and removes the tar); ``python host_cache.py link TARGET LINK...`` points
symbolic links at entries, replacing any already there.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tarfile
from collections.abc import Callable

# Python 3.11.4+ checks what a tar extracts; an older one (Debian 12 has 3.11.2) unpacks our own archive
# as it is.
SAFE_EXTRACT = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}


def entry(root: str, key: str) -> str:
    return os.path.join(root, key)


def make_once(root: str, key: str, make: Callable[[str], None]) -> bool:
    """``<root>/<key>``, made by ``make(scratch folder)`` unless it is there already: True if made here."""
    target = entry(root, key)
    if os.path.isdir(target):  # complete: only ever renamed into place whole
        return False
    os.makedirs(root, mode=0o700, exist_ok=True)  # made here: the owner's only (data may be private)
    with open(os.path.join(root, f"{key}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # someone else making the same entry: wait for them
        if os.path.isdir(target):
            return False
        scratch = os.path.join(root, f"{key}.making")
        shutil.rmtree(scratch, ignore_errors=True)  # an attempt that died: nobody holds its lock
        os.makedirs(scratch)
        try:
            make(scratch)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        os.rename(scratch, target)
    return True


def link(target: str, link_path: str) -> None:
    """``link_path`` -> ``target``, atomically replacing whatever link was there."""
    os.makedirs(os.path.dirname(link_path), exist_ok=True)
    temporary = f"{link_path}.{os.getpid()}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    os.symlink(target, temporary)
    os.replace(temporary, link_path)


def main() -> None:
    command, args = sys.argv[1], sys.argv[2:]
    if command == "missing":
        root, keys = args[0], args[1:]
        print(json.dumps([key for key in keys if not os.path.isdir(entry(root, key))]))
    elif command == "unpack":
        root, key, archive = args

        def extract(scratch: str) -> None:
            with tarfile.open(archive) as tar:
                tar.extractall(scratch, **SAFE_EXTRACT)

        try:
            make_once(root, key, extract)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(archive)
    elif command == "link":
        for target, link_path in zip(args[::2], args[1::2], strict=True):
            link(target, link_path)
    else:
        sys.exit(f"host_cache: unknown command {command!r}")


if __name__ == "__main__":
    main()
