"""A fake container's first process: run inside the pod's network namespace by the fake kubelet, in a
UTS and mount namespace of its own. Sets the pod's host name, gives it a /run of its own, binds its
volumes at their mount paths, enters the working directory and becomes the container's command
(argv[1]: a JSON spec)."""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sys

MS_BIND = 4096
MS_REC = 16384


def bind(source: str, target: str) -> None:
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.exists(target):
            open(target, "a").close()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, MS_BIND | MS_REC, None) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"bind {source} -> {target}: {os.strerror(errno)}")


def private_run() -> None:
    """A /run of the container's own, as an image's is: what is mounted there (the service account's
    credentials at /var/run/secrets) makes no folder on this machine, where clients would take it for
    a sign that they run in a cluster."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", b"/run", b"tmpfs", 0, b"mode=755") != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"tmpfs on /run: {os.strerror(errno)}")


def main() -> None:
    with open(sys.argv[1]) as handle:
        spec = json.load(handle)
    socket.sethostname(spec["hostname"])
    if any(os.path.realpath(target).startswith("/run/") for _, target in spec["mounts"]):
        private_run()
    for source, target in spec["mounts"]:
        bind(source, target)
    os.makedirs(spec["workdir"], exist_ok=True)
    os.chdir(spec["workdir"])
    env = spec["env"]
    try:
        os.execvpe(spec["argv"][0], spec["argv"], env)
    except OSError as error:
        print(f"fake container: cannot run {spec['argv'][0]}: {error}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
