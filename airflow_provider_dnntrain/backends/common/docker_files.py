"""Files into and out of a Docker container as tar streams (``put_archive``, ``get_archive``): what the
Docker launcher, its serving, environment images and daemon locks share. Works the same with a daemon
on another host, and on a container that is not running."""

from __future__ import annotations

import io
import tarfile
import time
from pathlib import Path


def tar_of(files: dict[str, bytes], mode: int = 0o644) -> bytes:
    """``files`` (relative path -> content) as a tar archive with their folders, for ``put_archive``."""
    buffer = io.BytesIO()
    folders = sorted({str(parent) for path in files for parent in Path(path).parents if str(parent) != "."})
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in folders:
            entry = tarfile.TarInfo(folder)
            entry.type, entry.mode, entry.mtime = tarfile.DIRTYPE, 0o755, int(time.time())
            tar.addfile(entry)
        for path, content in files.items():
            entry = tarfile.TarInfo(path)
            entry.size, entry.mode, entry.mtime = len(content), mode, int(time.time())
            tar.addfile(entry, io.BytesIO(content))
    return buffer.getvalue()


def put_files(api, container: str, files: dict[str, bytes], mode: int = 0o644) -> None:
    """``files`` by absolute path in the container, with their folders."""
    api.put_archive(
        container, "/", tar_of({path.lstrip("/"): content for path, content in files.items()}, mode)
    )


def read_file(api, container: str, path: str) -> bytes | None:
    """A file of the container (None: there is none, or no such container)."""
    from docker.errors import NotFound

    try:
        stream, _ = api.get_archive(container, path)
    except NotFound:
        return None
    with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
        member = tar.next()
        extracted = tar.extractfile(member) if member is not None and member.isfile() else None
        return extracted.read() if extracted is not None else None
