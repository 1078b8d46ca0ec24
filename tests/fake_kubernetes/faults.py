"""How the fake cluster misbehaves the way real ones do, switched per test (``POST /fake/faults``,
``POST /fake/rbac``; ``FakeCluster.faults`` / ``FakeCluster.role``):

- a share of API requests answered 429 (with ``Retry-After``), 500 or 503 - some only after the
  request was carried out, as when etcd answers late: the client never hears that it worked;
- a share held past the client's timeout (then carried out all the same);
- ``pods/log`` streams cut every few seconds, in the middle of a line; ``pods/exec`` streams cut
  in the middle of the transfer;
- RBAC: the token bound to a Role (its rules as Kubernetes writes them), 403 for anything else -
  including, as the OwnerReferencesPermissionEnforcement admission plugin does, an owner reference
  with ``blockOwnerDeletion`` without ``update`` on the owner's ``finalizers``.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from dataclasses import dataclass, field, fields

from aiohttp import web

_FAULT_STATUSES = {429: "TooManyRequests", 500: "InternalError", 503: "ServiceUnavailable"}
_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


@dataclass
class Faults:
    error_rate: float = 0.0  # share of requests answered with one of ``statuses``
    statuses: list[int] = field(default_factory=lambda: [429, 500, 503])
    retry_after: int = 1  # seconds, on a 429
    delay_rate: float = 0.0  # share of requests held ``delay_seconds`` before they are carried out
    delay_seconds: float = 0.0
    cut_logs_after: float = 0.0  # a log stream is cut this many seconds after it opened (0: never)
    cut_execs: int = 0  # how many of the next exec streams are cut in the middle of the transfer
    lose_answers: int = 0  # how many of the next changes (POST, PATCH, DELETE) are made, then answered 500
    # What keeps pods Pending for good reasons (fake_scheduler.py): Kueue, the autoscaler, a registry.
    kueue_admit_after: float = 0.0
    scale_up_after: float = 0.0
    images_appear_after: dict[str, float] = field(default_factory=dict)
    injected: Counter = field(default_factory=Counter)

    def update(self, settings: dict) -> None:
        names = {f.name for f in fields(self)} - {"injected"}
        unknown = set(settings) - names
        if unknown:
            raise ValueError(f"unknown faults: {sorted(unknown)}")
        fresh = Faults(**settings)
        for name in names:
            setattr(self, name, getattr(fresh, name))

    def cut_exec(self) -> bool:
        if self.cut_execs > 0:
            self.cut_execs -= 1
            self.injected["exec cut"] += 1
            return True
        return False


@dataclass
class Rbac:
    """The Role the token is bound to (``None``: everything is allowed)."""

    rules: list[dict] | None = None
    denied: Counter = field(default_factory=Counter)

    def allows(self, verb: str, group: str, resource: str) -> bool:
        if self.rules is None:
            return True
        for rule in self.rules:
            if (
                _matches(rule.get("apiGroups", []), group)
                and _matches(rule.get("resources", []), resource)
                and _matches(rule.get("verbs", []), verb)
            ):
                return True
        return False


def _matches(allowed: list[str], value: str) -> bool:
    return "*" in allowed or value in allowed


def verb_of(request: web.Request) -> str:
    info = request.match_info
    if request.method == "GET":
        if info.get("sub") in ("exec", "portforward"):  # a websocket upgrade: authorized as create
            return "create"
        if "name" in info:
            return "get"
        return "watch" if (request.query.get("watch") or "").lower() in ("true", "1") else "list"
    if request.method == "DELETE":
        return "delete" if "name" in info else "deletecollection"
    return _VERBS.get(request.method, request.method.lower())


def forbidden(verb: str, group: str, resource: str, namespace: str) -> web.Response:
    message = (
        f'{resource} is forbidden: User "system:serviceaccount:{namespace}:dnntrain-launcher" cannot '
        f'{verb} resource "{resource}" in API group "{group}" in the namespace "{namespace}"'
    )
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message}
    body.update({"reason": "Forbidden", "code": 403, "details": {"kind": resource}})
    return web.json_response(body, status=403)


def middleware(faults: Faults, rbac: Rbac):
    """Faults first (a real API server sheds load before it authorizes), then RBAC."""

    @web.middleware
    async def misbehave(request: web.Request, handler):
        if request.path.startswith("/fake/"):
            return await handler(request)
        if random.random() < faults.delay_rate:
            faults.injected["delayed"] += 1
            await asyncio.sleep(faults.delay_seconds)
        if faults.lose_answers > 0 and request.method in ("POST", "DELETE", "PATCH"):
            faults.lose_answers -= 1
            faults.injected["500 after the change"] += 1
            await handler(request)
            return _fault(500, faults.retry_after)
        if random.random() < faults.error_rate:
            status = random.choice(faults.statuses)
            faults.injected[f"{status}"] += 1
            late = status != 429 and request.method in ("POST", "DELETE", "PATCH") and random.random() < 0.5
            if late:  # carried out, but the answer is lost
                faults.injected[f"{status} after the change"] += 1
                await handler(request)
            return _fault(status, faults.retry_after)
        refusal = _authorize(request, rbac)
        if refusal is not None:
            return refusal
        return await handler(request)

    return misbehave


def _fault(status: int, retry_after: int) -> web.Response:
    reason = _FAULT_STATUSES.get(status, "InternalError")
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
    body.update({"message": f"injected: {reason}", "reason": reason, "code": status})
    headers = {"Retry-After": str(retry_after)} if status == 429 else {}
    return web.json_response(body, status=status, headers=headers)


def _authorize(request: web.Request, rbac: Rbac) -> web.Response | None:
    info = request.match_info
    if rbac.rules is None or "plural" not in info and "sub" not in info:
        return None
    group = info.get("group", "")
    resource = info.get("plural", "pods") + (f"/{info['sub']}" if info.get("sub") else "")
    verb = verb_of(request)
    if not rbac.allows(verb, group, resource):
        rbac.denied[f"{verb} {resource}"] += 1
        return forbidden(verb, group, resource, info.get("namespace", ""))
    return None


async def owner_references_allowed(request: web.Request, rbac: Rbac) -> web.Response | None:
    """OwnerReferencesPermissionEnforcement: ``blockOwnerDeletion`` needs ``update`` on the owner's
    ``finalizers``."""
    if rbac.rules is None or request.method != "POST":
        return None
    body = json.loads(await request.read() or b"{}")
    for reference in (body.get("metadata") or {}).get("ownerReferences") or []:
        if reference.get("blockOwnerDeletion"):
            plural = reference["kind"].lower() + "s"
            group = reference["apiVersion"].rpartition("/")[0]
            if not rbac.allows("update", group, f"{plural}/finalizers"):
                rbac.denied[f"update {plural}/finalizers"] += 1
                return forbidden("update", group, f"{plural}/finalizers", request.match_info["namespace"])
    return None


def routes(app: web.Application, faults: Faults, rbac: Rbac) -> None:
    async def set_faults(request: web.Request) -> web.Response:
        faults.update(await request.json())
        return web.json_response({"injected": dict(faults.injected)})

    async def injected(request: web.Request) -> web.Response:
        return web.json_response({"injected": dict(faults.injected), "denied": dict(rbac.denied)})

    async def set_rbac(request: web.Request) -> web.Response:
        rbac.rules = (await request.json()).get("rules")
        return web.json_response({"rules": rbac.rules})

    app.router.add_post("/fake/faults", set_faults)
    app.router.add_get("/fake/faults", injected)
    app.router.add_post("/fake/rbac", set_rbac)
