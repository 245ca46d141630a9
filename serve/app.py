"""The Ray Serve application: a FastAPI ingress in front of a batching generator deployment.

    omnidiff serve up --config configs/serve.yaml          # start (see serve/cli.py)
    curl -s 127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \\
         -d '{"prompt": "一个红色的圆", "response_format": "b64_json"}'

Two deployments (issue 7):

* ``Generator`` loads the pipeline once per replica and runs the sampling loop. Concurrent
  requests are gathered by ``@serve.batch`` into one loop (``batch_size_fn`` counts images, so
  a request for n images takes n slots). Text encoding (LLM + adapter) stays in the same
  replica: on CPU both share the same cores, and splitting them only adds a hop.
* ``ImageAPI`` is the HTTP ingress (FastAPI, built on the replica by ``build_fastapi``):
  validation, auth, OpenAI-shaped errors, and backpressure. The bounded queue is the
  generator's ``max_queued_requests``; when it is full the handle raises ``BackPressureError``
  at once and the ingress answers 503 with a JSON body and ``Retry-After`` (Serve's own
  rejection is text/plain, NOTES.md).

``build_app(cfg)`` returns the bound application; ``run(cfg)`` starts Serve on
``cfg.host:cfg.port`` (127.0.0.1 by default) and deploys it. Rolling to a new model version
is another ``run`` with the same app name: the new replicas load the model before the old
ones stop (``max_surge_percent``), and stopping replicas finish their requests first.
"""


import asyncio
import base64
import io
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from omnidiff.config import ConfigError, to_dict
from omnidiff.env import subdir
from serve import auth
from serve.config import ServeConfig, parse_size
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
# Env vars a replica needs to find the model: the registry, and the project's model cache.
_REPLICA_ENV = ("MLFLOW_TRACKING_URI", "OMNIDIFF_HOME", "OMNIDIFF_MODELS", "HF_HOME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE")
_REGISTRY_REF = re.compile(r"^(?P<name>[A-Za-z0-9_.-]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>[0-9]+))?$")


# ----------------------------------------------------------------------------- which model


def pin_model(cfg: ServeConfig) -> dict[str, Any]:
    """Resolve ``cfg.model`` to one fixed model, in the driver, so every replica loads the same one.

    Returns ``{"id", "source", "ref", "version", "alias", "created", "registry"}``: ``ref`` is what a
    replica loads (a folder, or ``name/version`` it resolves itself); ``registry`` holds the version's
    tags and run id (lineage). A bare name tries ``cfg.alias`` then ``cfg.fallback_alias``.
    """
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        folder = path.resolve()
        if not (folder / "model_index.json").is_file():
            raise ConfigError(f"model={cfg.model!r}: folder has no model_index.json (not a pipeline folder)")
        return {"id": folder.name, "source": str(folder), "ref": str(folder), "version": None, "alias": None,
                "created": int(folder.stat().st_mtime), "registry": {}}
    match = _REGISTRY_REF.match(cfg.model)
    if not match:
        raise ConfigError(f"model={cfg.model!r}: neither a pipeline folder nor a registry ref (name, name@alias, name/3)")
    name = match.group("name")
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        raise ConfigError(
            f"model={cfg.model!r}: a registry ref needs MLFLOW_TRACKING_URI (run `omnidiff stack up`) "
            "or give a pipeline folder path"
        )
    client = MlflowClient()
    if match.group("version"):
        try:
            mv = client.get_model_version(name, match.group("version"))
        except MlflowException as exc:
            raise ConfigError(f"model={cfg.model!r}: no such registered model version ({exc.message})") from None
        alias = None
    else:
        aliases = [match.group("alias")] if match.group("alias") else [a for a in (cfg.alias, cfg.fallback_alias) if a]
        mv, alias, errors = None, None, []
        for candidate in aliases:
            try:
                mv, alias = client.get_model_version_by_alias(name, candidate), candidate
                break
            except MlflowException as exc:
                errors.append(f"@{candidate}: {exc.message}")
        if mv is None:
            raise ConfigError(f"model={cfg.model!r}: no version of {name!r} has alias {' or '.join(aliases)} ({'; '.join(errors)})")
    registry = {str(k): str(v) for k, v in (mv.tags or {}).items()}
    if mv.run_id:
        registry.setdefault("run_id", mv.run_id)
    registry["model_version"] = str(mv.version)
    return {"id": name, "source": f"models:/{name}@{alias}" if alias else f"models:/{name}/{mv.version}",
            "ref": f"{name}/{mv.version}", "version": str(mv.version), "alias": alias,
            "created": int((mv.creation_timestamp or 0) / 1000), "registry": registry}


def _flat_strings(data: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            out.update(_flat_strings(value, f"{prefix}{key}."))
    elif isinstance(data, list):
        out[prefix.rstrip(".")] = ",".join(str(v) for v in data)
    elif data is not None:
        out[prefix.rstrip(".")] = str(data)
    return out


def model_card(pinned: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The served model as /v1/models shows it: pinned registry facts + the folder's lineage.json."""
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    lineage_file = folder / "lineage.json"
    lineage = _flat_strings(json.loads(lineage_file.read_text(encoding="utf-8"))) if lineage_file.is_file() else {}
    lineage.update(pinned["registry"])  # the registry's tags are the authority when both say something
    return {"id": pinned["id"], "object": "model", "created": pinned["created"], "owned_by": "omnidiff",
            "version": pinned["version"], "alias": pinned["alias"], "source": pinned["source"],
            "conditioning": index.get("conditioning"), "lineage": lineage}


# ----------------------------------------------------------------------------- generator


def _images_in(jobs: list[dict]) -> int:
    """Batch size in images, not requests (``@serve.batch``'s ``batch_size_fn``)."""
    return sum(job["n"] for job in jobs)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@serve.deployment(name="Generator")
class GeneratorDeployment:
    """Loads the pipeline once and turns batches of jobs into PNGs.

    A job is ``{"prompt", "negative_prompt", "n", "steps", "guidance_scale", "width", "height", "seeds"}``;
    the answer ``{"images": [png bytes], "seconds", "batch_size", "version"}``.
    """

    def __init__(self, pinned: dict[str, Any], batching: dict[str, Any], sizes: list[str], torch_threads: int,
                 device: str):
        import torch

        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pinned = pinned
        folder = Path(pinned["ref"])
        if not folder.is_dir():  # a registry ref: resolve it here, on this replica's node
            from omnidiff.tracking import resolve_model

            folder = Path(resolve_model(pinned["ref"]))
        from omnidiff.pipeline import OmniDiffusionPipeline

        self.pipe = OmniDiffusionPipeline.from_pretrained(folder, device=device)
        # One step at every allowed size: a size this model cannot make fails the deployment here,
        # with its name, instead of as a 500 on some later request; and first-call costs are paid now.
        for size in [None, *sizes]:
            width, height = parse_size(size) if size else (None, None)
            try:
                self.pipe(["warm-up"], num_inference_steps=1, guidance_scale=2.0, seed=0, height=height, width=width)
            except ValueError as exc:
                raise ConfigError(f"limits.sizes: {size!r} does not work with {pinned['source']}: {exc}") from None
        self.card_data = model_card(pinned, folder)
        self.batching = bool(batching["enabled"])
        self.batches = 0
        if self.batching:
            self._batched.set_max_batch_size(int(batching["max_batch_size"]))
            self._batched.set_batch_wait_timeout_s(float(batching["batch_wait_timeout_s"]))
        self._one_at_a_time = asyncio.Lock()
        log.info("generator ready: %s (%s) on %s, batching=%s", pinned["source"], folder, device, self.batching)

    async def card(self) -> dict[str, Any]:
        return self.card_data

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        if self.batching:
            return await self._batched(job)
        # Batching off: one request per sampling loop, one loop at a time (the baseline).
        async with self._one_at_a_time:
            return (await asyncio.to_thread(self._sample, [job]))[0]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # In a thread: the replica's event loop keeps accepting (and batching) requests meanwhile.
        return await asyncio.to_thread(self._sample, jobs)

    def _sample(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One sampling loop per distinct (steps, guidance, size, negative prompt) in the batch."""
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, job in enumerate(jobs):
            key = (job["steps"], job["guidance_scale"], job["width"], job["height"], job["negative_prompt"])
            groups.setdefault(key, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for (steps, guidance, width, height, negative), members in groups.items():
            prompts = [jobs[i]["prompt"] for i in members for _ in range(jobs[i]["n"])]
            seeds = [s for i in members for s in jobs[i]["seeds"]]
            t0 = time.perf_counter()
            images = self.pipe(
                prompts,
                negative_prompt=negative,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seeds,
                height=height,
                width=width,
            )
            seconds = time.perf_counter() - t0
            self.batches += 1
            cursor = 0
            for i in members:
                n = jobs[i]["n"]
                mine = images[cursor:cursor + n]
                results[i] = {"images": [_png(im) for im in mine], "seconds": seconds, "batch_size": len(prompts),
                              "model": self.pinned["id"], "version": self.pinned["version"],
                              "size": "{}x{}".format(*mine[0].size)}
                cursor += n
        return results


# ----------------------------------------------------------------------------- HTTP ingress


class Overloaded(Exception):
    """The bounded queue in front of the generator is full."""


class Unavailable(Exception):
    """No generator replica can take the request (not started, or failed)."""


class GenerationBackend(Protocol):
    async def generate(self, job: dict[str, Any]) -> dict[str, Any]: ...

    async def card(self, timeout_s: float) -> dict[str, Any]: ...


class HandleBackend:
    """The generator deployment behind a Serve handle, with Serve's errors mapped to ours."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, *args, timeout_s: float | None = None):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            response = getattr(self.handle, method).remote(*args)
            if timeout_s is None:
                return await response
            return await asyncio.wait_for(response, timeout_s)
        except BackPressureError as exc:
            raise Overloaded(str(exc)) from None
        except DeploymentUnavailableError as exc:
            raise Unavailable(str(exc)) from None
        except TimeoutError:
            raise Unavailable(f"the generator did not answer within {timeout_s}s") from None

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        return await self._call("generate", job)

    async def card(self, timeout_s: float) -> dict[str, Any]:
        return await self._call("card", timeout_s=timeout_s)


@dataclass(frozen=True)
class ApiSettings:
    """What the ingress needs from the config (plain values: it travels to the replicas)."""

    limits: dict[str, Any]
    token_digest: str | None
    retry_after_s: int
    route_prefix: str
    model_ids: tuple[str, ...] = ()
    title: str = "omnidiff image API"


def model_ids(pinned: dict[str, Any]) -> tuple[str, ...]:
    """The names a request's ``model`` may use for the served model: id, id/version, id@alias."""
    ids = [pinned["id"]]
    if pinned["version"]:
        ids.append(f"{pinned['id']}/{pinned['version']}")
    if pinned["alias"]:
        ids.append(f"{pinned['id']}@{pinned['alias']}")
    return tuple(ids)


def settings_from_config(cfg: ServeConfig, token_digest: str | None, pinned: dict[str, Any] | None = None) -> ApiSettings:
    return ApiSettings(limits=to_dict(cfg.limits), token_digest=token_digest, retry_after_s=cfg.retry_after_s,
                       route_prefix=cfg.route_prefix, model_ids=model_ids(pinned) if pinned else ())


def _error(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    """FastAPI's validation failure -> 400 naming the first field at fault."""
    first = exc.errors()[0] if exc.errors() else {}
    kind = first.get("type", "")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if kind == "json_invalid":
        return _error(400, f"request body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                      "invalid_request_error", None, "invalid_json")
    param = ".".join(loc) if loc else None
    if param is None:
        message = f"request body: {first.get('msg', 'invalid')} (expected a JSON object)"
        return _error(400, message, "invalid_request_error", None, "invalid_body")
    if kind == "missing":
        return _error(400, f"{param}: field required", "invalid_request_error", param, "missing_field")
    if kind == "string_pattern_mismatch":
        return _error(400, f"{param}: must contain a non-whitespace character", "invalid_request_error", param,
                      "invalid_value")
    if kind == "extra_forbidden":
        return _error(400, f"{param}: unknown field", "invalid_request_error", param, "unknown_field")
    return _error(400, f"{param}: {first.get('msg', 'invalid value')}", "invalid_request_error", param, "invalid_value")


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


def build_fastapi(settings: ApiSettings, backend: GenerationBackend | None) -> FastAPI:
    """The HTTP API. ``backend`` None builds it for its OpenAPI spec only."""
    from omnidiff.config import from_dict
    from serve.config import LimitsConfig

    limits = from_dict(LimitsConfig, settings.limits)
    bodies = request_models(limits, tuple(settings.model_ids))
    ImagesRequest, GenerateRequest = bodies.images, bodies.generate
    app = FastAPI(title=settings.title, version="1", docs_url=None, redoc_url=None,
                  description="OmniDiffusion: prompts in any language, OpenAI-compatible image generation.")
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
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
        return _validation_error(exc)

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
        return _error(503, "server overloaded: the request queue is full, retry later", "server_overloaded", None,
                      "queue_full", headers={"Retry-After": str(settings.retry_after_s)})

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
        return (None, None) if size in (None, "auto") else parse_size(size)  # None: the model's own size

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

    @app.get("/v1/models", response_model=ModelList, tags=["models"], dependencies=guarded, responses=get_errors,
             summary="The served model, its registry version and lineage.")
    async def list_models():
        return ModelList(data=[ModelCard(**await card())])

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
    page_config = json.dumps({"prefix": prefix, "sizes": list(limits.sizes), "max_n": limits.max_n,
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


@serve.deployment(name="ImageAPI")
@serve.ingress()
class ImageAPIDeployment:
    """The HTTP ingress; its FastAPI app is built on the replica (``__serve_build_asgi_app__``)."""

    def __init__(self, generator, settings: ApiSettings):
        self.backend = HandleBackend(generator)
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self.settings, self.backend)


# ----------------------------------------------------------------------------- build / run


def build_app(cfg: ServeConfig, pinned: dict[str, Any] | None = None):
    """The bound Serve application for ``cfg`` (model pinned now unless given; token read now, only its hash kept)."""
    token = auth.load_token(cfg.auth.token_env, cfg.auth.token_file)
    if token is None and cfg.auth.required:
        raise ConfigError(f"auth.required=True: no token in ${cfg.auth.token_env} or auth.token_file={cfg.auth.token_file}")
    digest = auth.token_digest(token) if token else None
    pinned = pinned or pin_model(cfg)
    env_vars = {key: os.environ[key] for key in _REPLICA_ENV if os.environ.get(key)}
    if cfg.autoscaling.enabled:
        scaling: dict[str, Any] = {"autoscaling_config": {
            "min_replicas": cfg.autoscaling.min_replicas, "max_replicas": cfg.autoscaling.max_replicas,
            "target_ongoing_requests": cfg.autoscaling.target_ongoing_requests}}
    else:
        scaling = {"num_replicas": cfg.replicas}
    generator = GeneratorDeployment.options(
        max_ongoing_requests=cfg.max_ongoing_requests,
        max_queued_requests=cfg.max_queued_requests,
        ray_actor_options={"num_cpus": cfg.cpus_per_replica, "num_gpus": cfg.gpus_per_replica,
                           "runtime_env": {"env_vars": env_vars}},
        max_surge_percent=cfg.rollout_surge_percent,
        **scaling,
    ).bind(pinned, to_dict(cfg.batching), list(cfg.limits.sizes), cfg.torch_threads, cfg.device)
    # The ingress only parses and forwards: no CPU reservation, and it must never be the bottleneck,
    # so its own queue is effectively unbounded (the bounded one is the generator's).
    ingress = ImageAPIDeployment.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env_vars}},
        max_surge_percent=cfg.rollout_surge_percent,
    )
    return ingress.bind(generator, settings_from_config(cfg, digest, pinned))


def base_url(cfg: ServeConfig, port: int | None = None) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{port or cfg.port}{cfg.route_prefix.rstrip('/')}"


def start_serve(cfg: ServeConfig) -> None:
    """Connect to Ray and make sure Serve's HTTP proxy listens on ``cfg.host:cfg.port``."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    serve.start(http_options={"host": cfg.host, "port": cfg.port}, proxy_location="HeadOnly")


def run(cfg: ServeConfig, wait_ready_s: float = 300.0) -> dict[str, Any]:
    """Deploy (or roll) the app named ``cfg.app_name``; returns ``{"url", "model", "app"}`` once ready."""
    start_serve(cfg)
    pinned = pin_model(cfg)
    serve.run(build_app(cfg, pinned), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    url = base_url(cfg)
    wait_ready(url, wait_ready_s)
    result = {"url": url, "app": cfg.app_name, "model": pinned, "config": to_dict(cfg)}
    _state_file(cfg.app_name).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def _state_file(app_name: str) -> Path:
    return subdir("serve") / f"{app_name}.json"


def running(app_name: str) -> dict[str, Any] | None:
    """What ``run`` last deployed as ``app_name`` (url, pinned model, config), or None."""
    path = _state_file(app_name)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def forget(app_name: str) -> None:
    _state_file(app_name).unlink(missing_ok=True)


def wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    import requests

    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline:
        try:
            answer = requests.get(f"{url}/readyz", timeout=5)
            if answer.status_code == 200:
                return answer.json()
            last = f"{answer.status_code} {answer.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s}s: {last}")


def shutdown(cfg: ServeConfig) -> None:
    """Delete the app; stop Serve altogether when no other app is left."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    serve.delete(cfg.app_name)
    forget(cfg.app_name)
    if not serve.status().applications:
        serve.shutdown()


def status(cfg: ServeConfig) -> dict[str, Any]:
    """The app's Serve status, replica counts, readiness and served model (``omnidiff serve status``)."""
    import requests

    from omnidiff.stack import ensure_ray

    ensure_ray()
    state = running(cfg.app_name) or {}
    report: dict[str, Any] = {"app": cfg.app_name, "status": "NOT_RUNNING", "ready": None}
    overview = serve.status().applications.get(cfg.app_name)
    if overview is None:
        return report
    report["status"] = str(getattr(overview.status, "value", overview.status))
    report["why"] = overview.message or None
    report["deployments"] = {
        name: {"status": str(getattr(d.status, "value", d.status)),
               "replicas": {str(getattr(k, "value", k)): v for k, v in d.replica_states.items()}}
        for name, d in overview.deployments.items()
    }
    url = state.get("url") or base_url(cfg)
    report["url"] = url
    headers = {}
    token = auth.load_token(cfg.auth.token_env, cfg.auth.token_file)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        report["ready"] = requests.get(f"{url}/readyz", timeout=5).status_code == 200
        models = requests.get(f"{url}/v1/models", headers=headers, timeout=5)
        if models.status_code == 200:
            report["model"] = models.json()["data"][0]
    except requests.RequestException as exc:
        report["ready"], report["why"] = False, f"{url}: {exc}"
    return report
