"""The serve stage's config: which model, where it listens, how it batches, queues and guards.

    omnidiff serve up --config configs/serve.yaml port=8001 batching.max_batch_size=16

One frozen :class:`ServeConfig` (kind ``serve``) is the whole surface: the CLI, the
Prefect ``deploy`` flow and the benchmark build the Ray Serve app from it and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

from omnidiff.config import require

_SIZE = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")


def parse_size(size: str) -> tuple[int, int]:
    """``"32x16"`` -> ``(width, height)`` = ``(32, 16)``."""
    match = _SIZE.match(size)
    if not match:
        raise ValueError(f"size={size!r}: expected WIDTHxHEIGHT, e.g. '32x32'")
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class BatchingConfig:
    """Dynamic batching of concurrent requests into one sampling loop (``@serve.batch``).

    enabled: batch concurrent requests; off = one request per sampling loop, one loop at a time.
    max_batch_size: most *images* (sum of ``n`` over the batched requests) in one sampling loop.
    batch_wait_timeout_s: how long the first request of a batch waits for company.
    """

    enabled: bool = True
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.05

    def __post_init__(self) -> None:
        require(1 <= self.max_batch_size <= 1024, "batching.max_batch_size", self.max_batch_size, "must be in [1, 1024]")
        require(
            0.0 <= self.batch_wait_timeout_s <= 10.0,
            "batching.batch_wait_timeout_s",
            self.batch_wait_timeout_s,
            "must be in [0, 10] seconds",
        )


@dataclass(frozen=True)
class LimitsConfig:
    """What a request may ask for; anything outside is a 400 naming the field.

    max_prompt_chars: longest prompt / negative prompt in characters (issue 7: 8,000).
    max_n: most images per request.
    max_steps / default_steps: sampling steps (``steps`` of /v1/generate; the OpenAI route uses the default).
    max_guidance_scale / default_guidance_scale: classifier-free guidance scale.
    sizes: the ``WIDTHxHEIGHT`` values a request may ask for besides ``auto`` (= omitted: the model's own
        size). Each is tried once when a replica starts, so one the model cannot make fails the deploy.
    max_body_bytes: larger request bodies are refused with 413 before they are parsed.
    """

    max_prompt_chars: int = 8000
    max_n: int = 4
    max_steps: int = 50
    default_steps: int = 20
    max_guidance_scale: float = 20.0
    default_guidance_scale: float = 3.0
    sizes: tuple[str, ...] = ("16x16", "32x32")
    max_body_bytes: int = 262144

    def __post_init__(self) -> None:
        require(1 <= self.max_prompt_chars <= 1_000_000, "limits.max_prompt_chars", self.max_prompt_chars, "must be in [1, 1e6]")
        require(1 <= self.max_n <= 64, "limits.max_n", self.max_n, "must be in [1, 64]")
        require(1 <= self.max_steps <= 1000, "limits.max_steps", self.max_steps, "must be in [1, 1000]")
        require(
            1 <= self.default_steps <= self.max_steps,
            "limits.default_steps",
            self.default_steps,
            f"must be in [1, max_steps={self.max_steps}]",
        )
        require(self.max_guidance_scale >= 0, "limits.max_guidance_scale", self.max_guidance_scale, "must be >= 0")
        require(
            0 <= self.default_guidance_scale <= self.max_guidance_scale,
            "limits.default_guidance_scale",
            self.default_guidance_scale,
            f"must be in [0, max_guidance_scale={self.max_guidance_scale}]",
        )
        require(len(self.sizes) >= 1, "limits.sizes", self.sizes, "needs at least one WIDTHxHEIGHT")
        for i, size in enumerate(self.sizes):
            require(bool(_SIZE.match(size)), f"limits.sizes[{i}]", size, "expected WIDTHxHEIGHT, e.g. '32x32'")
        require(len(set(self.sizes)) == len(self.sizes), "limits.sizes", self.sizes, "has duplicates")
        # A body must at least hold a maximal prompt (UTF-8 up to 4 bytes a character, JSON escapes up to 12).
        require(self.max_body_bytes >= 1024, "limits.max_body_bytes", self.max_body_bytes, "must be >= 1024")


@dataclass(frozen=True)
class AuthConfig:
    """Optional bearer-token auth on every /v1 route (the playground page, /healthz and /readyz stay open).

    token_env: environment variable holding the token (read where ``serve up`` runs).
    token_file: a secret file holding the token (first line); used when the variable is unset or empty.
    required: refuse to start when no token is found (instead of serving without auth).
    Neither set / found -> no auth. Only a SHA-256 of the token travels to the replicas.
    """

    token_env: str = "OMNIDIFF_SERVE_TOKEN"
    token_file: Path | None = None
    required: bool = False

    def __post_init__(self) -> None:
        require(bool(re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", self.token_env)), "auth.token_env", self.token_env,
                "must be an environment variable name")


@dataclass(frozen=True)
class AutoscalingConfig:
    """Ray Serve autoscaling of the generator deployment (used instead of ``replicas`` when enabled)."""

    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 2
    target_ongoing_requests: float = 8.0

    def __post_init__(self) -> None:
        require(self.min_replicas >= 0, "autoscaling.min_replicas", self.min_replicas, "must be >= 0")
        require(
            self.max_replicas >= max(1, self.min_replicas),
            "autoscaling.max_replicas",
            self.max_replicas,
            f"must be >= max(1, min_replicas={self.min_replicas})",
        )
        require(self.target_ongoing_requests > 0, "autoscaling.target_ongoing_requests",
                self.target_ongoing_requests, "must be > 0")


@dataclass(frozen=True)
class ServeConfig:
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
    sampling_nice: how much lower the CPU priority of the sampling threads is than the rest of the
        replica (Linux nice increment, 0 = same), so that a saturated CPU still answers 503s and
        health checks quickly.
    max_ongoing_requests: requests one generator replica holds at once (batching needs >= max_batch_size).
    max_queued_requests: bounded queue in front of the generator; beyond it requests get 503 + Retry-After.
    retry_after_s: the Retry-After header of a 503, in seconds.
    rollout_surge_percent: extra replicas started during a rolling update, so a new model version is
        loaded before the old replicas stop (no dropped requests).
    """

    kind: ClassVar[str] = "serve"

    model: str = "omnidiff-tiny"
    alias: str = "production"
    fallback_alias: str | None = "candidate"
    app_name: str = "omnidiff"
    host: str = "127.0.0.1"
    port: int = 8000
    route_prefix: str = "/"
    replicas: int = 1
    ingress_replicas: int = 1
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0
    torch_threads: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    sampling_nice: int = 10
    max_ongoing_requests: int = 32
    max_queued_requests: int = 32
    retry_after_s: int = 1
    rollout_surge_percent: int = 100
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        require(bool(self.model.strip()), "model", self.model, "must name a registered model or a pipeline folder")
        for key in ("alias", "fallback_alias"):
            value = getattr(self, key)
            if value is not None:
                require(bool(re.match(r"^[A-Za-z0-9_-]+$", value)), key, value, "must be a registry alias name")
        require(bool(re.match(r"^[A-Za-z0-9_-]+$", self.app_name)), "app_name", self.app_name,
                "letters, digits, '-' and '_' only")
        require(bool(self.host.strip()), "host", self.host, "must be an interface address (127.0.0.1 by default)")
        require(0 <= self.port <= 65535, "port", self.port, "must be in [0, 65535]")
        require(self.route_prefix.startswith("/"), "route_prefix", self.route_prefix, "must start with '/'")
        require(self.replicas >= 1, "replicas", self.replicas, "must be >= 1")
        require(self.ingress_replicas >= 1, "ingress_replicas", self.ingress_replicas, "must be >= 1")
        require(self.cpus_per_replica >= 0, "cpus_per_replica", self.cpus_per_replica, "must be >= 0")
        require(self.gpus_per_replica >= 0, "gpus_per_replica", self.gpus_per_replica, "must be >= 0")
        require(self.torch_threads >= 0, "torch_threads", self.torch_threads, "must be >= 0 (0 = torch default)")
        require(0 <= self.sampling_nice <= 19, "sampling_nice", self.sampling_nice, "must be in [0, 19]")
        require(self.max_ongoing_requests >= 1, "max_ongoing_requests", self.max_ongoing_requests, "must be >= 1")
        require(self.max_queued_requests >= 1, "max_queued_requests", self.max_queued_requests,
                "must be >= 1 (the queue must be bounded)")
        require(self.retry_after_s >= 1, "retry_after_s", self.retry_after_s, "must be >= 1 second")
        require(0 <= self.rollout_surge_percent <= 100, "rollout_surge_percent", self.rollout_surge_percent,
                "must be in [0, 100]")
        if self.batching.enabled:
            require(
                self.batching.max_batch_size >= self.limits.max_n,
                "batching.max_batch_size",
                self.batching.max_batch_size,
                f"must be >= limits.max_n={self.limits.max_n} (one request's images share a batch)",
            )
            # Each batched request holds one ongoing slot: fewer slots than a batch never fills one.
            require(
                self.max_ongoing_requests >= self.batching.max_batch_size,
                "max_ongoing_requests",
                self.max_ongoing_requests,
                f"must be >= batching.max_batch_size={self.batching.max_batch_size}",
            )

