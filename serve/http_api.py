"""The HTTP API as a FastAPI app: routes, validation, auth, OpenAI-shaped errors, the playground.

``build_fastapi(settings, backend)`` is what the Ray Serve ingress runs on each replica
(serve/app.py); with ``backend=None`` it builds the app for its OpenAPI spec alone. Nothing here
imports Ray: the generator is reached through a ``GenerationBackend`` and its failures arrive as
:class:`Overloaded` (503 + Retry-After) and :class:`Unavailable`.
"""

import base64
import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnidiff.config import to_dict
from serve import auth
from serve.config import ServeConfig, parse_size
from serve.edge import host_name, overloaded_message
from serve.models import public_card
from serve.schemas import (
    SEED_MAX,
    ErrorResponse,
    GenerateResponse,
    Health,
    ImageData,
    ImagesResponse,
    ModelCard,
    ModelList,
    Readiness,
    request_models,
)

log = logging.getLogger("omnidiff.serve")

PLAYGROUND = Path(__file__).with_name("playground.html")


class Overloaded(Exception):
    """Admitting the request would pass the bound on queued work or requests (serve/admission.py).

    ``retry_after_s``: when it may fit, from the measured drain rate (None: the configured fallback).
    """

    def __init__(self, message: str, retry_after_s: int | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(Exception):
    """No generator replica can take the request (not started, or failed)."""


class GenerationBackend(Protocol):
    async def generate(self, job: dict[str, Any]) -> dict[str, Any]: ...

    async def card(self, timeout_s: float) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ApiSettings:
    """What the ingress needs from the config (plain values: it travels to the replicas)."""

    limits: dict[str, Any]
    token_digest: str | None
    retry_after_s: int
    route_prefix: str
    model_ids: tuple[str, ...] = ()
    capacity: int | None = None
    admission: dict[str, Any] | None = None  # AdmissionConfig of one ingress replica (its share of the budget)
    title: str = "omnidiff image API"
    # What the served model can draw (serve/models.py) and what the OpenAI route forgives (cfg.openai).
    sizes: tuple[str, ...] = ()
    native_size: str | None = None
    model_aliases: tuple[str, ...] = ()
    unsupported_size: str = "error"
    allowed_hosts: tuple[str, ...] = ("*",)  # Host header values answered (``allowed_hosts`` below)


def model_ids(pinned: dict[str, Any]) -> tuple[str, ...]:
    """The names a request's ``model`` may use for the served model: id, id/version, id@alias."""
    ids = [pinned["id"]]
    if pinned["version"]:
        ids.append(f"{pinned['id']}/{pinned['version']}")
    if pinned["alias"]:
        ids.append(f"{pinned['id']}@{pinned['alias']}")
    return tuple(ids)


def settings_from_config(cfg: ServeConfig, token_digest: str | None, pinned: dict[str, Any] | None = None) -> ApiSettings:
    replicas = cfg.autoscaling.max_replicas if cfg.autoscaling.enabled else cfg.replicas
    admission = to_dict(cfg.admission)
    admission["max_queued_work"] = max(1, cfg.admission.max_queued_work // cfg.ingress_replicas)
    return ApiSettings(limits=to_dict(cfg.limits), token_digest=token_digest, retry_after_s=cfg.retry_after_s,
                       route_prefix=cfg.route_prefix, model_ids=model_ids(pinned) if pinned else (),
                       capacity=replicas * cfg.max_ongoing_requests + cfg.max_queued_requests, admission=admission,
                       allowed_hosts=allowed_hosts(cfg), **_model_settings(cfg, pinned))


LOOPBACK = ("127.0.0.1", "localhost", "::1")


def allowed_hosts(cfg: ServeConfig) -> tuple[str, ...]:
    """``http.allowed_hosts``, or by default the loopback names when the API binds loopback (a page
    rebound to 127.0.0.1 still sends its own Host and gets 400), anything when it binds a public address."""
    if cfg.http.allowed_hosts is not None:
        return tuple(cfg.http.allowed_hosts)
    return ("127.0.0.1", "localhost", "[::1]") if cfg.host in LOOPBACK else ("*",)


def _model_settings(cfg: ServeConfig, pinned: dict[str, Any] | None) -> dict[str, Any]:
    """Sizes from the pinned model (without one, e.g. for the spec alone: ``limits.sizes``, if set)."""
    sizes = pinned["sizes"] if pinned else (cfg.limits.sizes or ())
    return {"sizes": tuple(sizes), "native_size": pinned["native_size"] if pinned else None,
            "model_aliases": tuple(cfg.openai.model_aliases), "unsupported_size": cfg.openai.unsupported_size}


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError, sizes: str | None = None) -> JSONResponse:
    """FastAPI's validation failure -> 400 naming the first field at fault (``sizes``: the supported ones, in words)."""
    first = exc.errors()[0] if exc.errors() else {}
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                      "invalid_request_error", None, "invalid_json")
    param = ".".join(loc) if loc else None
    if param == "size" and sizes and kind in ("literal_error", "string_pattern_mismatch", "string_type"):
        return _error(400, f"size: {first.get('input')!r} is not a size this model supports; {sizes}",
                      "invalid_request_error", param, "unsupported_size")
    if param is None:
        message = (f"request body: {first.get('msg', 'invalid')} "
                   "(send a JSON object with Content-Type: application/json)")
        return _error(400, message, "invalid_request_error", None, "invalid_body")
    if kind == "missing":
        return _error(400, f"{param}: field required", "invalid_request_error", param, "missing_field")
    if kind == "string_pattern_mismatch" and param == "size":
        return _error(400, f"size: {first.get('input')!r}: expected WIDTHxHEIGHT or 'auto'", "invalid_request_error",
                      param, "invalid_value")
    if kind == "string_pattern_mismatch":
        return _error(400, f"{param}: must contain a non-whitespace character", "invalid_request_error", param,
                      "invalid_value")
    if kind == "extra_forbidden":
        return _error(400, f"{param}: unknown field", "invalid_request_error", param, "unknown_field")
    return _error(400, f"{param}: {first.get('msg', 'invalid value')}", "invalid_request_error", param, "invalid_value")


class _HostCheck:
    """400 with a JSON error for a Host header not in ``allowed`` (DNS rebinding: a foreign page whose
    name now resolves to 127.0.0.1 still sends its own name). Port ignored; ``[::1]`` for IPv6."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {h.lower() for h in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host, name = host_name(scope["headers"])
            if name not in self.allowed:
                response = _error(400, f"Host {host!r} is not served here (serve http.allowed_hosts)",
                                  "invalid_request_error", code="invalid_host")
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before they are parsed (chunked ones too)."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        too_big = JSONResponse(
            {"error": {"message": f"request body over {self.max_bytes} bytes", "type": "invalid_request_error",
                       "param": None, "code": "body_too_large"}},
            status_code=413,
        )
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await too_big(scope, receive, send)
        seen, exceeded, replied = 0, False, False

        async def limited_receive():
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    exceeded = True
                    return {"type": "http.request", "body": b"", "more_body": False}
            return message

        async def guarded_send(message):
            nonlocal replied
            if not exceeded:
                return await send(message)
            if not replied:  # swap whatever the app answers to a truncated body for the 413
                replied = True
                await too_big(scope, receive, send)

        await self.app(scope, limited_receive, guarded_send)


def _overloaded(exc: Overloaded, fallback_retry_after_s: int) -> JSONResponse:
    retry_after = exc.retry_after_s or fallback_retry_after_s
    return _error(503, overloaded_message(str(exc), retry_after), "server_overloaded", None, "queue_full",
                  headers={"Retry-After": str(retry_after)})


class _LoadShed:
    """Answer a generation request 503 from its method, path and token alone when the backend's ``gate``
    says nothing could be admitted now: no body read, no validation, no call to the generator, so a
    burst's rejections stay quick. Other requests, and all when the backend has no ``gate``, pass."""

    def __init__(self, app, backend, token_digest: str | None, retry_after_s: int):
        self.app, self.backend = app, backend
        self.token_digest, self.retry_after_s = token_digest, retry_after_s
        self.enabled = callable(getattr(backend, "gate", None))

    async def __call__(self, scope, receive, send):
        if not (self.enabled and scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].endswith(("/v1/generate", "/v1/images/generations"))):
            return await self.app(scope, receive, send)
        if self.token_digest is not None:  # a caller without the token gets its 401, not our 503
            authorization = dict(scope.get("headers") or ()).get(b"authorization", b"").decode("latin-1")
            if not auth.bearer_ok(authorization, self.token_digest):
                return await self.app(scope, receive, send)
        with self.backend.gate() as refused:
            if refused is not None:
                return await _overloaded(refused, self.retry_after_s)(scope, receive, send)
            await self.app(scope, receive, send)


def build_fastapi(settings: ApiSettings, backend: GenerationBackend | None) -> FastAPI:
    """The HTTP API. ``backend`` None builds it for its OpenAPI spec only."""
    from omnidiff.config import from_dict
    from serve.config import LimitsConfig

    limits = from_dict(LimitsConfig, settings.limits)
    bodies = request_models(limits, tuple(settings.model_ids) + tuple(settings.model_aliases) if settings.model_ids
                            else (), settings.sizes or None, settings.unsupported_size == "native")
    sizes_in_words = (f"supported sizes: {', '.join(settings.sizes)}, or 'auto' (the model's own"
                      + (f", {settings.native_size})" if settings.native_size else ")")) if settings.sizes else None
    ImagesRequest, GenerateRequest = bodies.images, bodies.generate
    app = FastAPI(title=settings.title, version="1", docs_url=None, redoc_url=None,
                  description="OmniDiffusion: prompts in any language, OpenAI-compatible image generation.")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(_LoadShed, backend=backend, token_digest=settings.token_digest,
                       retry_after_s=settings.retry_after_s)
    if "*" not in settings.allowed_hosts:  # added last: runs first (a foreign Host costs nothing)
        app.add_middleware(_HostCheck, allowed=settings.allowed_hosts)
    bearer = HTTPBearer(auto_error=False, description="Bearer token, when the server was started with one.")
    state: dict[str, Any] = {"card": None}
    prefix = settings.route_prefix.rstrip("/")

    async def require_token(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)):
        if not auth.bearer_ok(request.headers.get("authorization"), settings.token_digest):
            raise _AuthFailed()

    guarded = [Depends(require_token)] if settings.token_digest else []
    errors = {
        400: {"model": ErrorResponse, "description": "Bad input; error.param names the field."},
        413: {"model": ErrorResponse, "description": "Request body too large."},
        503: {"model": ErrorResponse, "description": "Overloaded (bounded queue full) or not ready; see Retry-After."},
    }
    if settings.token_digest:
        errors[401] = {"model": ErrorResponse, "description": "Missing or wrong bearer token."}
    get_errors = {k: v for k, v in errors.items() if k in (401, 503)}

    @app.exception_handler(RequestValidationError)
    async def on_validation(_: Request, exc: RequestValidationError):
        return _validation_error(exc, sizes_in_words)

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error", None, f"http_{exc.status_code}",
                      headers=getattr(exc, "headers", None))

    @app.exception_handler(_AuthFailed)
    async def on_auth(_: Request, exc: _AuthFailed):
        return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)", "authentication_error",
                      None, "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(Overloaded)
    async def on_overload(_: Request, exc: Overloaded):
        return _overloaded(exc, settings.retry_after_s)

    @app.exception_handler(Unavailable)
    async def on_unavailable(_: Request, exc: Unavailable):
        return _error(503, f"model not ready: {exc}", "not_ready", None, "not_ready",
                      headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(Exception)
    async def on_crash(_: Request, exc: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(exc).__name__}", "server_error", None, "internal")

    async def card(timeout_s: float = 5.0) -> dict[str, Any]:
        # Refreshed on each call (a roll changes it); the last good one answers while the queue is full.
        assert backend is not None
        try:
            state["card"] = await backend.card(timeout_s)
        except (Overloaded, Unavailable):
            if state["card"] is None:
                raise
        return state["card"]

    @app.exception_handler(_BadField)
    async def on_bad_field(_: Request, exc: _BadField):
        return _error(400, exc.message, "invalid_request_error", exc.param, "invalid_value")

    def size_of(size: str | None) -> tuple[int | None, int | None]:
        if size in (None, "auto") or (settings.sizes and size not in settings.sizes):  # only openai + native
            return None, None  # the model's own size
        return parse_size(size)

    def seeds_for(seed: int | None, n: int) -> list[int]:
        first = secrets.randbelow(SEED_MAX + 1) if seed is None else seed
        return [(first + i) % (SEED_MAX + 1) for i in range(n)]

    @app.get("/healthz", response_model=Health, tags=["ops"], summary="Liveness: the HTTP server answers.")
    async def healthz():
        return Health()

    @app.get("/readyz", response_model=Readiness, tags=["ops"], summary="Readiness: the model is loaded.",
             responses={503: {"model": ErrorResponse, "description": "Model not loaded yet."}})
    async def readyz():
        # Once a generator has answered, ready stays cheap: under load a fresh ask would wait in its queue.
        served = state["card"] or await card(timeout_s=2.0)
        return Readiness(ready=True, model=served["id"], version=served["version"])

    @app.get("/v1/models", response_model=ModelList, response_model_exclude_none=True, tags=["models"],
             responses=get_errors, summary="The served model: its names, sizes and example prompts.",
             description="Open to all. With the server's bearer token (Authorization: Bearer <token>) the card "
                         "also shows its source and lineage; a wrong token is a 401.")
    async def list_models(request: Request):
        # Open without a token (the playground needs the sizes and examples before one is typed), but
        # then it shows no server paths, run ids or flow-run ids. The token is optional here, so the spec
        # declares no security requirement (a client or fuzzer would read one as "401 without it").
        header = request.headers.get("authorization")
        full = settings.token_digest is not None and header is not None
        if full and not auth.bearer_ok(header, settings.token_digest):
            raise _AuthFailed()
        served = await card()
        names = list(settings.model_ids or (served["id"],)) + list(settings.model_aliases)
        shown = served if full else public_card(served)
        return ModelList(data=[ModelCard(**{**shown, "aliases": names})])

    @app.post("/v1/images/generations", response_model=ImagesResponse, tags=["images"], dependencies=guarded,
              responses=errors, summary="OpenAI-compatible image generation.")
    async def images_generations(body: ImagesRequest):  # type: ignore[valid-type]
        width, height = size_of(body.size)
        job = {"prompt": body.prompt, "negative_prompt": None, "n": body.n, "steps": limits.default_steps,
               "guidance_scale": limits.default_guidance_scale, "width": width, "height": height,
               "seeds": seeds_for(None, body.n)}
        result = await backend.generate(job)
        encoded = [base64.b64encode(png).decode("ascii") for png in result["images"]]
        if body.response_format == "url":
            data = [ImageData(url=f"data:image/png;base64,{b64}") for b64 in encoded]
        else:
            data = [ImageData(b64_json=b64) for b64 in encoded]
        return ImagesResponse(created=int(time.time()), data=data)

    @app.post("/v1/generate", tags=["images"], dependencies=guarded, summary="Native generation: every knob.",
              response_model=GenerateResponse,
              responses={**errors, 200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                                         "description": "JSON with base64 PNGs, or the PNG itself (response_format=png)."}})
    async def generate(body: GenerateRequest):  # type: ignore[valid-type]
        if body.response_format == "png" and body.n != 1:
            raise _BadField("response_format", "response_format: 'png' returns one image; use n=1 or 'json'")
        width, height = size_of(body.size)
        seeds = seeds_for(body.seed, body.n)
        job = {"prompt": body.prompt, "negative_prompt": body.negative_prompt, "n": body.n, "steps": body.steps,
               "guidance_scale": float(body.guidance_scale), "width": width, "height": height, "seeds": seeds}
        result = await backend.generate(job)
        headers = {"X-Model-Version": str(result["version"]), "X-Seed": str(seeds[0])}
        if body.response_format == "png":
            return Response(result["images"][0], media_type="image/png", headers=headers)
        payload = GenerateResponse(
            model=result["model"], version=result["version"],
            images=[base64.b64encode(png).decode("ascii") for png in result["images"]], seeds=seeds,
            size=result["size"], steps=body.steps, guidance_scale=float(body.guidance_scale),
            seconds=round(float(result["seconds"]), 4), batch_size=int(result["batch_size"]),
        )
        return JSONResponse(payload.model_dump(), headers=headers)

    page = PLAYGROUND.read_text(encoding="utf-8")
    page_config = json.dumps({"prefix": prefix, "sizes": list(settings.sizes or limits.sizes or ()), "max_n": limits.max_n,
                              "max_steps": limits.max_steps, "default_steps": limits.default_steps,
                              "max_prompt_chars": limits.max_prompt_chars,
                              "default_guidance_scale": limits.default_guidance_scale,
                              "max_guidance_scale": limits.max_guidance_scale,
                              "auth": settings.token_digest is not None})
    # Safe inside <script>: no "</script>" or "<!--" can come out of the JSON.
    page = page.replace("__PLAYGROUND_CONFIG__", page_config.replace("<", "\\u003c"))

    @app.get("/", response_class=HTMLResponse, tags=["playground"], summary="A page to try prompts in any language.")
    async def playground():
        return HTMLResponse(page, headers={
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                                       "img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'",
            "X-Content-Type-Options": "nosniff",
        })

    def openapi() -> dict[str, Any]:
        # We answer bad input with 400 (OpenAI's status), not FastAPI's 422: the spec must say so.
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in spec.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


class _AuthFailed(Exception):
    pass


class _BadField(Exception):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message
