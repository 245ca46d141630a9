"""The serve stage's config: which model, where it listens, how it batches, queues and guards.

    omnidiff serve up --config configs/serve.yaml port=8001 batching.max_batch_size=16

One frozen :class:`ServeConfig` (kind ``serve``) is the whole surface: the CLI, the
Prefect ``deploy`` flow and the benchmark build the Ray Serve app from it and nothing else.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, NonBlank, require

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
_ALIAS = r"^[A-Za-z0-9_-]+$"  # a registry alias name


def parse_size(size: str) -> tuple[int, int]:
    """``"32x16"`` -> ``(width, height)`` = ``(32, 16)``."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size={size!r}: expected WIDTHxHEIGHT, e.g. '32x32'")
    return int(match.group(1)), int(match.group(2))


class BatchingConfig(ConfigModel):
    """Dynamic batching of concurrent requests into one sampling loop (``@serve.batch``).

    enabled: batch concurrent requests; off = one request per sampling loop, one loop at a time.
    max_batch_size: most *images* (sum of ``n`` over the batched requests) in one sampling loop.
    batch_wait_timeout_s: how long the first request of a batch waits for company.
    """

    enabled: bool = True
    max_batch_size: int = Field(16, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(0.05, ge=0.0, le=10.0)


class LimitsConfig(ConfigModel):
    """What a request may ask for; anything outside is a 400 naming the field.

    max_prompt_chars: longest prompt / negative prompt in characters (issue 7: 8,000).
    max_n: most images per request.
    max_steps / default_steps: sampling steps (``steps`` of /v1/generate; the OpenAI route uses the default).
    max_guidance_scale / default_guidance_scale: classifier-free guidance scale.
    sizes: the ``WIDTHxHEIGHT`` values a request may ask for besides ``auto`` (= omitted: the model's own
        size). None (the default): every size the served model's card lists (serve/models.py: its
        ``card.json`` sizes, else the size it was trained at); a list narrows those, and a size the card
        does not list fails the deploy naming the card's sizes. Each is tried once when a replica starts.
    max_body_bytes: larger request bodies are refused with 413 before they are parsed. A body must at
        least hold a maximal prompt (UTF-8 up to 4 bytes a character, JSON escapes up to 12).
    """

    max_prompt_chars: int = Field(8000, ge=1, le=1_000_000)
    max_n: int = Field(4, ge=1, le=64)
    max_steps: int = Field(50, ge=1, le=1000)
    default_steps: int = Field(20, ge=1)
    max_guidance_scale: float = Field(20.0, ge=0)
    default_guidance_scale: float = Field(3.0, ge=0)
    sizes: tuple[str, ...] | None = Field(None, min_length=1)
    max_body_bytes: int = Field(262144, ge=1024)

    @model_validator(mode="after")
    def _check(self) -> LimitsConfig:
        require(self.default_steps <= self.max_steps, "default_steps", self.default_steps,
                f"must be in [1, max_steps={self.max_steps}]")
        require(self.default_guidance_scale <= self.max_guidance_scale, "default_guidance_scale",
                self.default_guidance_scale, f"must be in [0, max_guidance_scale={self.max_guidance_scale}]")
        for i, size in enumerate(self.sizes or ()):
            require(bool(_SIZE.match(size)), f"sizes[{i}]", size, "expected WIDTHxHEIGHT, e.g. '32x32'")
        require(len(set(self.sizes or ())) == len(self.sizes or ()), "sizes", self.sizes, "has duplicates")
        return self


class OpenAIConfig(ConfigModel):
    """What the OpenAI-compatible route (POST /v1/images/generations) forgives, so that OpenAI clients and
    tools work with the values they send by default or by habit (issue 15 item 6).

    model_aliases: more ``model`` names that mean the served model (besides its id, ``id/version`` and
        ``id@alias``): the OpenAI image model names tools send without asking. Empty: only the served names.
    unsupported_size: what a ``size`` the model's card does not list gets: ``error`` (400 naming the
        supported sizes) or ``native`` (drawn at the model's own size, as ``auto``; the answer's images
        show the size they have). The native route /v1/generate always answers 400.

    ``quality`` (standard, hd, low, medium, high, xhigh, max, auto) and ``style`` (vivid, natural) are
    accepted and ignored: the route samples ``limits.default_steps`` steps whatever they say (ask
    /v1/generate for more steps). ``output_format`` may only be png, ``background`` auto or opaque.
    """

    model_aliases: tuple[str, ...] = ("dall-e-2", "dall-e-3", "gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5",
                                      "gpt-image-2")
    unsupported_size: Literal["error", "native"] = "error"

    @model_validator(mode="after")
    def _check(self) -> OpenAIConfig:
        for i, alias in enumerate(self.model_aliases):
            require(bool(re.match(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$", alias)), f"model_aliases[{i}]", alias,
                    "expected a model name (letters, digits, '.', '_', ':', '-')")
        require(len(set(self.model_aliases)) == len(self.model_aliases), "model_aliases", self.model_aliases,
                "has duplicates")
        return self


class AdmissionConfig(ConfigModel):
    """Cost-aware admission in the ingress (serve/admission.py): the bound is on queued work, not requests.

    max_queued_work: most sampling work admitted and unfinished at once, in pixel-steps summed over
        requests (``n x steps x width x height``; a default 16x16, 20-step image is 5,120). Past it a
        request gets 503 with a Retry-After from the measured drain rate. A request costing more than
        the whole budget is admitted only when nothing else is (it runs alone). With several ingress
        replicas each holds ``max_queued_work / ingress_replicas``.
    max_retry_after_s: cap on the Retry-After of a 503 (seconds).
    throughput_window_s: time constant of the measured throughput (pixel-steps per busy second).
    edge: Serve's HTTP proxy admits generation requests itself, with the same pricing and the whole
        budget, so a burst's 503s never reach the ingress (serve/edge.py). Applied where the proxy
        runs on the machine that deploys the app, and from the proxy's start (like ``http``).
    """

    max_queued_work: int = Field(500_000, ge=1)
    max_retry_after_s: int = Field(120, ge=1, le=86_400)
    throughput_window_s: float = Field(60.0, gt=0, le=3600)
    edge: bool = True


class HttpConfig(ConfigModel):
    """Slow and oversized clients at Serve's HTTP proxy (serve/http_guard.py; issue 15).

    header_timeout_s: a request's line and headers must arrive within this many seconds of the
        connection opening (or of the request's first byte on a kept-alive connection), else the
        connection is closed.
    body_timeout_s: a request's body must arrive within this many seconds of its headers, else
        408 and the connection is closed.
    max_header_count: most header fields in a request; more is 431 and a closed connection.
    max_header_bytes: most bytes of request line + headers; more is 431 and a closed connection.
    keep_alive_timeout_s: an idle kept-alive connection is closed after this many seconds.
    allowed_hosts: Host header values the API answers (a DNS-rebinding page sends its own name, and
        gets 400). ``null``: 127.0.0.1, localhost and [::1] when ``host`` is a loopback address,
        anything otherwise (behind a load balancer or ingress, list its names here).
    Applied when Serve's proxy starts (``serve.start``): a Serve instance already running keeps the
    settings it was started with (``omnidiff serve down`` first to change them).
    """

    header_timeout_s: float = Field(10.0, gt=0, le=3600)
    body_timeout_s: float = Field(30.0, gt=0, le=3600)
    max_header_count: int = Field(100, ge=8, le=10_000)
    max_header_bytes: int = Field(65536, ge=4096, le=16 * 1024 * 1024)
    keep_alive_timeout_s: int = Field(5, ge=1, le=3600)
    allowed_hosts: list[str] | None = None


class AuthConfig(ConfigModel):
    """Optional bearer-token auth on every /v1 route (the playground page, /healthz and /readyz stay open).

    token_env: environment variable holding the token (read where ``serve up`` runs).
    token_file: a secret file holding the token (first line); used when the variable is unset or empty.
    require_token: refuse to start when no token is found (instead of serving without auth).
    Neither set / found -> no auth. Only a SHA-256 of the token travels to the replicas.
    """

    token_env: str = Field("OMNIDIFF_SERVE_TOKEN", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")  # a variable name
    token_file: Path | None = None
    require_token: bool = False


class AutoscalingConfig(ConfigModel):
    """Ray Serve autoscaling of the generator deployment (used instead of ``replicas`` when enabled)."""

    enabled: bool = False
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = 2
    target_ongoing_requests: float = Field(8.0, gt=0)

    @model_validator(mode="after")
    def _check(self) -> AutoscalingConfig:
        require(self.max_replicas >= max(1, self.min_replicas), "max_replicas", self.max_replicas,
                f"must be >= max(1, min_replicas={self.min_replicas})")
        return self


class ServeConfig(ConfigModel):
    """Serving the registered model on Ray Serve (issue 7).

    model: what to serve: a registered model name (served at ``alias``, falling back to
        ``fallback_alias``), ``name@alias``, ``name/version``, or a pipeline folder path.
    alias / fallback_alias: registry aliases tried in order when ``model`` is a bare name.
    app_name: the Ray Serve application name.
    host / port: where Serve's HTTP proxy listens (127.0.0.1 by default: not reachable from outside).
    route_prefix: the URL prefix of the app.
    replicas: generator replicas (ignored when autoscaling is enabled).
    ingress_replicas: FastAPI ingress replicas.
    cpus_per_replica / gpus_per_replica: Ray resources of one generator replica.
    torch_threads: intra-op threads of one generator replica (0 = torch's default).
    device: ``auto`` (cuda when there is one), ``cpu`` or ``cuda``.
    dtype: the UNet's and VAE's torch dtype: ``auto`` (float16 on a GPU, float32 on the CPU),
        ``float32``, ``float16`` or ``bfloat16`` (half precision on a GPU only).
    vae_slicing / vae_tiling: decode a batch one image at a time / in overlapping tiles (diffusers'
        AutoencoderKL switches): large images (SDXL's 1024 px) in less memory, a little slower.
    sampling_nice: how much lower the CPU priority of the sampling threads is than the rest of the
        replica (Linux nice increment, 0 = same), so that a saturated CPU still answers 503s and
        health checks quickly.
    max_ongoing_requests: requests one generator replica holds at once (batching needs >= max_batch_size).
    max_queued_requests: bounded queue in front of the generator; beyond it requests get 503 + Retry-After.
        (A second bound, on requests; the first is on work: ``admission``.)
    retry_after_s: the Retry-After of a 503 before any request has finished (no throughput measured
        yet), and of a 503 for a generator that is not ready, in seconds.
    rollout_surge_percent: extra replicas started during a rolling update, so a new model version is
        loaded before the old replicas stop (no dropped requests).
    openai: what the OpenAI-compatible route forgives (:class:`OpenAIConfig`).
    admission: the bound on queued work (:class:`AdmissionConfig`).
    http: timeouts and header limits for slow or oversized clients (:class:`HttpConfig`).
    """

    kind: ClassVar[str] = "serve"

    model: NonBlank = "omnidiff-tiny"
    alias: str = Field("production", pattern=_ALIAS)
    fallback_alias: str | None = Field("candidate", pattern=_ALIAS)
    app_name: str = Field("omnidiff", pattern=r"^[A-Za-z0-9_-]+$")
    host: NonBlank = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    replicas: int = Field(1, ge=1)
    ingress_replicas: int = Field(1, ge=1)
    cpus_per_replica: float = Field(1.0, ge=0)
    gpus_per_replica: float = Field(0.0, ge=0)
    torch_threads: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    vae_slicing: bool = False
    vae_tiling: bool = False
    sampling_nice: int = Field(10, ge=0, le=19)
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(32, ge=1)  # the queue must be bounded
    retry_after_s: int = Field(1, ge=1)
    rollout_surge_percent: int = Field(100, ge=0, le=100)
    batching: BatchingConfig = Field(default_factory=BatchingConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    admission: AdmissionConfig = Field(default_factory=AdmissionConfig)
    http: HttpConfig = Field(default_factory=HttpConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    openai: OpenAIConfig = Field(default_factory=OpenAIConfig)
    autoscaling: AutoscalingConfig = Field(default_factory=AutoscalingConfig)

    @model_validator(mode="after")
    def _batches_fit(self) -> ServeConfig:
        if self.batching.enabled:
            require(self.batching.max_batch_size >= self.limits.max_n, "batching.max_batch_size",
                    self.batching.max_batch_size,
                    f"must be >= limits.max_n={self.limits.max_n} (one request's images share a batch)")
            # Each batched request holds one ongoing slot: fewer slots than a batch never fills one.
            require(self.max_ongoing_requests >= self.batching.max_batch_size, "max_ongoing_requests",
                    self.max_ongoing_requests, f"must be >= batching.max_batch_size={self.batching.max_batch_size}")
        return self
