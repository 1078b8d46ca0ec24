"""Datasets by URI (``Input(uri=..., mode="download")``), fetched on the Airflow worker through Airflow's
``ObjectStoragePath`` with the input's connection, into a cache shared by every later run.

A cache entry is keyed by the source and its version: the URI plus every file's relative name, size and
the version the store gives (ETag, generation, Last-Modified, mtime), so a changed object is fetched
anew and an unchanged one never is. The entry holds the file, or the folder, under the URI's last name.
Launchers point ``<inputs folder>/<name>`` at the entry on each host their replicas run on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit, urlunsplit

from airflow_provider_dnntrain.backends.common.folders import beside_runs
from airflow_provider_dnntrain.backends.common.host_cache import entry, make_once
from airflow_provider_dnntrain.spec import Input, TrainingJob

log = logging.getLogger(__name__)

# What stores call an object's version, most precise first.
_VERSION_FIELDS = (
    "ETag",
    "etag",
    "generation",
    "VersionId",
    "md5Hash",
    "Content-MD5",
    "LastModified",
    "Last-Modified",
    "updated",
    "mtime",
)


_FETCHING_AT_ONCE = 8


class InputUnavailable(RuntimeError):
    """An input could not be found or fetched; the message names it."""


@dataclass(frozen=True)
class ResolvedInput:
    item: Input
    key: str
    files: list[tuple[str, str, int]]  # (name under the leaf, the store's path, size if known)


def default_cache_root() -> Path:
    return beside_runs("inputs")


def shown(uri: str) -> str:
    """The URI without credentials it may carry (``https://user:password@host/...``)."""
    parts = urlsplit(uri)
    if "@" not in parts.netloc:
        return uri
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def _failure(item: Input, error: Exception) -> str:
    """An error's text without the URI's credentials (ObjectStoragePath takes them for a connection id
    and names it)."""
    userinfo = urlsplit(item.uri).netloc.rpartition("@")[0]
    return str(error).replace(userinfo, "***") if userinfo else str(error)


def resolve(item: Input) -> ResolvedInput:
    """What the input's URI holds now, and its cache key; ``InputUnavailable`` if it holds nothing."""
    from airflow.sdk import ObjectStoragePath

    check_destination(item)
    try:
        source = ObjectStoragePath(item.uri, conn_id=item.conn_id)
        fs, path = source.fs, source.path
        fs.invalidate_cache()  # a listing this process saw earlier may be stale: versions are the point
        if item.scheme in ("http", "https"):  # a web server's folder is its index page: said by the URI
            folder = item.uri.endswith("/")
            found = fs.find(path, detail=True) if folder else {path: fs.info(path)}
        else:
            info = fs.info(path)
            folder = info.get("type") == "directory"
            found = fs.find(path, detail=True) if folder else {path: info}
    except FileNotFoundError:  # also what fsspec makes of an HTTP server's 401/403
        credentials = f"connection {item.conn_id!r}" if item.conn_id else "no connection (conn_id)"
        raise InputUnavailable(
            f"inputs.{item.name}: {shown(item.uri)} does not exist, or cannot be read with {credentials}"
        ) from None
    except Exception as error:
        raise InputUnavailable(
            f"inputs.{item.name}: cannot read {shown(item.uri)}: {_failure(item, error)}"
        ) from None
    base = path.rstrip("/")
    files = sorted(
        (name[len(base) :].lstrip("/") if folder else "", name, int(info.get("size") or 0))
        for name, info in found.items()
        # A web server's index links outside the folder too (nginx's "../"): not part of it.
        if not folder or (name.startswith(base + "/") and ".." not in PurePosixPath(name[len(base) :]).parts)
    )
    if not files:
        raise InputUnavailable(f"inputs.{item.name}: {shown(item.uri)} is an empty folder")
    versions = [[rel, size, _version(found[name])] for rel, name, size in files]
    content = json.dumps({"uri": item.uri.rstrip("/"), "files": versions})
    return ResolvedInput(item, hashlib.sha256(content.encode()).hexdigest()[:24], files)


def check_destination(item: Input) -> None:
    """A web server's input with a connection: only on the connection's own server (``ValueError``
    naming the input otherwise), so a URI from conf cannot take its credentials elsewhere."""
    if item.scheme in ("http", "https"):
        from airflow_provider_dnntrain.fs.http import check_destination as on_its_server

        on_its_server(item.conn_id, item.uri, f"inputs.{item.name}")


def check_destinations(job: TrainingJob) -> None:
    for item in downloads(job):
        check_destination(item)


def _version(info: dict) -> str | None:
    return next((str(info[name]) for name in _VERSION_FIELDS if info.get(name) is not None), None)


def fetch(resolved: ResolvedInput, cache_root: Path) -> tuple[Path, bool]:
    """The cache entry holding the input (fetched unless it is there already), and whether it was
    fetched now."""
    item = resolved.item

    def download(scratch: str) -> None:
        from airflow.sdk import ObjectStoragePath

        fs = ObjectStoragePath(item.uri, conn_id=item.conn_id).fs
        leaf = Path(scratch) / item.leaf
        targets = [str(leaf / rel) if rel else str(leaf) for rel, _, _ in resolved.files]
        for target in targets:
            Path(target).parent.mkdir(parents=True, exist_ok=True)
        # File by file, some at once: fs.get would first ask of each whether it is a folder (a web
        # server's file is read whole for that).
        with ThreadPoolExecutor(_FETCHING_AT_ONCE) as pool:
            list(pool.map(fs.get_file, [name for _, name, _ in resolved.files], targets))

    began = time.monotonic()
    try:
        fetched = make_once(str(cache_root), resolved.key, download)
    except Exception as error:
        raise InputUnavailable(
            f"inputs.{item.name}: fetching {shown(item.uri)} failed: {_failure(item, error)}"
        ) from None
    folder = Path(entry(str(cache_root), resolved.key))
    if fetched:
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        how = f"fetched ({len(resolved.files)} file(s), {_size(size)}) in {time.monotonic() - began:.2f} s"
    else:
        how = "cached"
    log.info("Input %s: %s %s", item.name, shown(item.uri), how)
    return folder, fetched


def downloads(job: TrainingJob) -> list[Input]:
    return [item for item in job.inputs if item.downloads]


def fetch_all(job: TrainingJob, cache_root: Path) -> dict[str, tuple[ResolvedInput, Path]]:
    """Every input the job downloads, in the cache here: by name, what it resolved to and its entry."""
    fetched = {}
    for item in downloads(job):
        resolved = resolve(item)
        fetched[item.name] = (resolved, fetch(resolved, cache_root)[0])
    return fetched


def pod_sources(job: TrainingJob, expires_in: float) -> str:
    """What pods fetch the job's downloads from, as JSON: each input's cache key, its name and files
    with a URL a pod can GET (an object store's signed URL, valid ``expires_in`` seconds; a web
    server's own, with the connection's headers). ``InputUnavailable`` for a store that signs none."""
    from airflow.sdk import ObjectStoragePath

    from airflow_provider_dnntrain.fs.http import request_headers

    sources = []
    for item in downloads(job):
        resolved = resolve(item)
        headers: dict[str, str] = {}
        if item.scheme in ("http", "https"):
            urls = [name for _, name, _ in resolved.files]
            headers = request_headers(item.conn_id)
        else:
            fs = ObjectStoragePath(item.uri, conn_id=item.conn_id).fs
            try:
                urls = [fs.sign(name, expiration=int(expires_in)) for _, name, _ in resolved.files]
            except NotImplementedError:
                raise InputUnavailable(
                    f"inputs.{item.name}: pods cannot fetch {shown(item.uri)} ({item.scheme}:// gives no "
                    "signed URLs): use an object store that does (s3://, gs://, https://...), or a volume "
                    "claim (uri='pvc://<claim>/<path>', mode='mount')"
                ) from None
        files = [[rel, url] for (rel, _, _), url in zip(resolved.files, urls, strict=True)]
        sources.append(
            {"name": item.name, "key": resolved.key, "leaf": item.leaf, "headers": headers, "files": files}
        )
    return json.dumps({"inputs": sources})


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"
