"""Admission at the edge: Ray Serve's HTTP proxy refuses over-budget generation requests itself (issue 15).

The ingress replica prices and admits every request (serve/admission.py), but under a burst its
503s are slow: each refused request is parsed by the proxy, routed, sent to the replica over Ray,
answered there and streamed back, and on a small box the proxy and the replica share the cores
with sampling. Here the same admission runs one hop earlier, inside the proxy's ASGI stack:

* The driver that deploys an app (``serve.app.run``) writes the app's :class:`EdgePolicy` (route
  prefix, token digest, allowed Host names, default steps, sizes, native size, the work budget) as
  ``<edge dir>/<app>.json``; ``shutdown`` removes it. The edge dir is a private (0700) folder on the
  driver's machine named after the proxy's port, handed to the proxy as ``$OMNIDIFF_SERVE_EDGE_DIR``
  with serve/http_guard.py's other proxy settings.
* :class:`EdgeAdmission`, installed by http_guard's proxy callback as a Starlette middleware of the
  proxy, matches a ``POST <prefix>/v1/generate`` or ``<prefix>/v1/images/generations`` to a policy,
  reads the (small) body, prices it exactly as the ingress does (``n x steps x width x height``) and
  admits it into a :class:`~serve.admission.WorkBudget` of its own, released when the response has
  been sent. Over budget: 503 with the ingress's error body and a ``Retry-After`` from the drain
  rate the proxy measures itself, without touching Ray.
* Anything the edge cannot price the same way as the ingress passes through untouched, and the
  ingress answers it as before (its own budget stays the authority): an unknown route, a foreign
  Host (400 there), a missing or wrong token (401), a body that is not JSON or not within the
  schema (400), an unlisted size, a body over the limit (413). The edge only ever refuses what the
  ingress would refuse, and it admits only what fits the same budget, so the ingress never sees more
  work than its budget. (Like the ingress's own first check, a request is refused on its cost and
  token alone: a body that fails validation elsewhere may get the 503 before its 400.)

Where the proxy runs on another machine than the driver (a cluster whose driver is not on the head
node), the proxy finds no policy and every request takes the ingress's own, slower, 503 path.
This module imports no Ray and no FastAPI (serve.config only for its size parser): it runs in the proxy process.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from serve import auth
from serve.admission import Overbudget, WorkBudget, job_cost
from serve.config import parse_size

log = logging.getLogger("omnidiff.serve")

ENV = "OMNIDIFF_SERVE_EDGE_DIR"
GENERATION_ROUTES = ("/v1/generate", "/v1/images/generations")
_RELOAD_EVERY_S = 0.25  # how often the proxy looks for new or changed policies


def edge_dir(port: int) -> Path:
    """The private folder where a driver publishes policies for the proxy listening on ``port``."""
    return Path(tempfile.gettempdir()) / f"omnidiff-serve-edge-{os.getuid()}-{int(port)}"


@dataclass(frozen=True)
class EdgePolicy:
    """What the edge needs to price and refuse one app's generation requests like its ingress does."""

    app: str
    route_prefix: str
    token_digest: str | None
    allowed_hosts: tuple[str, ...]
    default_steps: int
    max_steps: int
    max_n: int
    max_body_bytes: int
    sizes: tuple[str, ...]
    native_size: str | None
    unsupported_size: str  # the OpenAI route: "error" (400, the ingress's) or "native"
    max_work: int
    max_requests: int | None
    fallback_retry_after_s: int
    max_retry_after_s: int
    throughput_window_s: float
    published_at: float = field(default_factory=time.time)

    def routes(self) -> tuple[str, ...]:
        prefix = self.route_prefix.rstrip("/")
        return tuple(prefix + route for route in GENERATION_ROUTES)

    def default_pixels(self) -> int | None:
        """Pixels of a request that names no size: the native size; else, like the ingress, the largest listed."""
        if self.native_size:
            width, height = parse_size(self.native_size)
            return width * height
        listed = [w * h for w, h in map(parse_size, self.sizes)]
        return max(listed) if listed else None

    def cost(self, path: str, body: bytes) -> int | None:
        """The request's pixel-steps, or None when the edge cannot price it as the ingress would (pass it on)."""
        try:
            fields = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(fields, dict) or not isinstance(fields.get("prompt"), str):
            return None
        n = fields.get("n", 1)
        if type(n) is not int or not 1 <= n <= self.max_n:
            return None
        openai = path.endswith(GENERATION_ROUTES[1])
        steps = self.default_steps if openai else fields.get("steps", self.default_steps)
        if type(steps) is not int or not 1 <= steps <= self.max_steps:
            return None
        size = fields.get("size")
        if size is None or size == "auto":
            pixels = self.default_pixels()
        elif isinstance(size, str) and _is_size(size) and (size in self.sizes or not self.sizes):
            width, height = parse_size(size)
            pixels = width * height
        elif openai and self.unsupported_size == "native" and isinstance(size, str) and _is_size(size):
            pixels = self.default_pixels()
        else:
            return None  # an unlisted or malformed size: the ingress's 400
        return None if pixels is None else job_cost(n, steps, pixels, 1)

    def budget(self) -> WorkBudget:
        return WorkBudget(max_work=self.max_work, max_requests=self.max_requests,
                          fallback_retry_after_s=self.fallback_retry_after_s,
                          max_retry_after_s=self.max_retry_after_s, window_s=self.throughput_window_s)


def _is_size(size: str) -> bool:
    try:
        parse_size(size)
    except ValueError:
        return False
    return True


def host_name(headers) -> tuple[str, str]:
    """(the Host header as sent, its name without the port) from ASGI headers; IPv6 names keep brackets."""
    host = next((v.decode("latin-1") for k, v in headers if k == b"host"), "").lower()
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 or host.startswith("[") and "]:" in host else host
    return host, name


def overloaded_message(reason: str, retry_after_s: int) -> str:
    """The text of a 503 for a full queue, the same from the edge and from the ingress."""
    return f"server overloaded: the request queue is full ({reason}); retry in {retry_after_s}s"


def overloaded_body(reason: str, retry_after_s: int) -> bytes:
    return json.dumps({"error": {"message": overloaded_message(reason, retry_after_s), "type": "server_overloaded",
                                 "param": None, "code": "queue_full"}}).encode()


# ----------------------------------------------------------------------------- publishing (the driver)


def publish(directory: Path, policy: EdgePolicy) -> Path:
    """Write ``policy`` for the proxy (atomically; the folder private to this user)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    target = directory / f"{policy.app}.json"
    staging = directory / f".{policy.app}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(asdict(policy)), encoding="utf-8")
    os.chmod(staging, 0o600)
    os.replace(staging, target)
    return target


def withdraw(directory: Path, app: str) -> None:
    (directory / f"{app}.json").unlink(missing_ok=True)


def read_policies(directory: Path) -> dict[str, EdgePolicy]:
    """The published policies by generation route; a file that does not parse is skipped with a warning."""
    routes: dict[str, EdgePolicy] = {}
    for path in sorted(directory.glob("*.json")):
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            raw["allowed_hosts"] = tuple(raw["allowed_hosts"])
            raw["sizes"] = tuple(raw["sizes"])
            policy = EdgePolicy(**raw)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("edge admission: ignoring %s: %s", path, exc)
            continue
        for route in policy.routes():
            routes[route] = policy
    return routes


# ----------------------------------------------------------------------------- the proxy's middleware


class EdgeAdmission:
    """Pure ASGI middleware of Serve's proxy: price and admit generation requests (module docstring)."""

    def __init__(self, app, directory: str):
        self.app, self.directory = app, Path(directory)
        self._routes: dict[str, EdgePolicy] = {}
        self._budgets: dict[str, tuple[EdgePolicy, WorkBudget]] = {}
        self._stamp: tuple | None = None
        self._checked = 0.0

    def _reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < _RELOAD_EVERY_S:
            return
        self._checked = now
        try:
            stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in self.directory.glob("*.json")))
        except OSError:
            stamp = ()
        if stamp == self._stamp:
            return
        self._stamp = stamp
        self._routes = read_policies(self.directory) if stamp else {}
        for policy in self._routes.values():
            known = self._budgets.get(policy.app)
            if known is None or known[0] != policy:
                # A new or changed app starts a fresh budget; the old one's requests release into it harmlessly.
                self._budgets[policy.app] = (policy, policy.budget())
        log.info("edge admission: %d generation routes from %s", len(self._routes), self.directory)

    def budget(self, app: str) -> WorkBudget | None:
        known = self._budgets.get(app)
        return None if known is None else known[1]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        self._reload()
        policy = self._routes.get(scope["path"])
        if policy is None:
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or ()
        if "*" not in policy.allowed_hosts and host_name(headers)[1] not in policy.allowed_hosts:
            return await self.app(scope, receive, send)
        if policy.token_digest is not None:
            authorization = dict(headers).get(b"authorization", b"").decode("latin-1")
            if not auth.bearer_ok(authorization, policy.token_digest):
                return await self.app(scope, receive, send)
        body, messages, complete = bytearray(), [], True
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                complete = False  # the client went away: let the app see it
                break
            body += message.get("body", b"")
            if len(body) > policy.max_body_bytes:
                complete = False  # the ingress answers 413
                break
            if not message.get("more_body", False):
                break
        replay = _Replay(messages, receive)
        cost = policy.cost(scope["path"], bytes(body)) if complete else None
        budget = self.budget(policy.app)
        if cost is None or budget is None:
            return await self.app(scope, replay, send)
        try:
            ticket = budget.admit(cost)
        except Overbudget as refused:
            retry_after = refused.retry_after_s or policy.fallback_retry_after_s
            payload = overloaded_body(str(refused), retry_after)
            await send({"type": "http.response.start", "status": 503,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode()),
                                    (b"retry-after", str(retry_after).encode()),
                                    (b"x-omnidiff-admission", b"edge")]})
            await send({"type": "http.response.body", "body": payload})
            return
        status = {"code": 0}
        # Forwarding a request into Ray is the proxy's costliest step; yield once first, so the
        # requests of a burst that arrived with this one get their (cheap) answers before it.
        await asyncio.sleep(0)

        async def watched_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, replay, watched_send)
        finally:
            budget.release(ticket, finished=200 <= status["code"] < 300)


class _Replay:
    """``receive`` that hands the buffered request messages back first, then the real stream."""

    def __init__(self, messages: list, receive):
        self.messages, self.receive = list(messages), receive

    async def __call__(self):
        if self.messages:
            return self.messages.pop(0)
        return await self.receive()
