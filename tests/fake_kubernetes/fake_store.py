"""The fake API server's object store: objects by (api prefix, namespace, plural, name), resource
versions, watchers, label selectors; and the formats both halves of the fake share."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone

TOKEN = "fake-cluster-token"  # the one bearer token the API server takes


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def log_timestamp() -> str:
    """RFC 3339 with nanoseconds, trailing zeros trimmed, as kubelet writes them."""
    ns = time.time_ns()
    seconds, nanos = divmod(ns, 1_000_000_000)
    whole = datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
    fraction = f"{nanos:09d}".rstrip("0")
    return f"{whole}.{fraction}Z" if fraction else f"{whole}Z"


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: ``$$`` is a literal ``$``, unknown references stay as written."""
    out, i = [], 0
    while i < len(text):
        if text[i] == "$" and i + 1 < len(text):
            following = text[i + 1]
            if following == "$":
                out.append("$")
                i += 2
                continue
            if following == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    out.append(env[name] if name in env else text[i : end + 1])
                    i = end + 1
                    continue
        out.append(text[i])
        i += 1
    return "".join(out)


def matches(labels: dict, selector: str) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key.strip()) == value.strip():
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key.strip()) != value.strip():
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class Store:
    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str, str], dict] = {}
        self.version = 0
        self.watchers: list[tuple[tuple[str, str, str], str, asyncio.Queue]] = []

    def bump(self, obj: dict) -> None:
        self.version += 1
        obj["metadata"]["resourceVersion"] = str(self.version)

    def emit(self, kind: str, key: tuple, obj: dict) -> None:
        for scope, selector, queue in self.watchers:
            if scope == key[:3] and matches(obj["metadata"].get("labels") or {}, selector):
                queue.put_nowait({"type": kind, "object": json.loads(json.dumps(obj))})

    def put(self, key: tuple, obj: dict, event: str) -> None:
        self.bump(obj)
        self.objects[key] = obj
        self.emit(event, key, obj)

    def remove(self, key: tuple) -> dict | None:
        obj = self.objects.pop(key, None)
        if obj is not None:
            self.bump(obj)
            self.emit("DELETED", key, obj)
        return obj

    def listed(self, scope: tuple, selector: str) -> list[dict]:
        return [
            obj
            for key, obj in self.objects.items()
            if key[:3] == scope and matches(obj["metadata"].get("labels") or {}, selector)
        ]
