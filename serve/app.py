"""The Ray Serve application: a FastAPI ingress in front of a batching generator deployment.

    omnidiff serve up --config configs/serve.yaml          # start (see serve/cli.py)
    curl -s 127.0.0.1:8000/v1/images/generations -H 'content-type: application/json' \\
         -d '{"prompt": "一个红色的圆", "response_format": "b64_json"}'

Two deployments (issue 7):

* ``Generator`` loads the pipeline once per replica and runs the sampling loop. Concurrent
  requests are gathered by ``@serve.batch`` into one loop (``batch_size_fn`` counts images, so
  a request for n images takes n slots). Text encoding (LLM + adapter) stays in the same
  replica: on CPU both share the same cores, and splitting them only adds a hop.
* ``ImageAPI`` is the HTTP ingress: the FastAPI app of serve/http_api.py (validation, auth,
  OpenAI-shaped errors), built on each replica. The bounded queue sits in front of the
  generator: ``max_queued_requests`` on its handle, and the same bound counted in the ingress so
  a full queue is answered at once with 503, a JSON body and ``Retry-After`` (Serve's own
  rejection is text/plain, NOTES.md).

``build_app(cfg)`` returns the bound application (the model pinned by serve/models.py);
``run(cfg)`` starts Serve on ``cfg.host:cfg.port`` (127.0.0.1 by default) and deploys it.
Rolling to a new model version is another ``run`` with the same app name: the new replicas
load the model before the old ones stop (``max_surge_percent``), stopping replicas finish what
they hold, and requests wait at the handle meanwhile (tests/test_serve_deploy.py).
"""

import asyncio
import contextlib
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from omnidiff import supervisor
from omnidiff.config import ConfigError, to_dict
from omnidiff.env import subdir
from serve import auth, edge, http_guard
from serve.admission import Overbudget, WorkBudget, job_cost
from serve.config import ServeConfig, parse_size
from serve.http_api import ApiSettings, Overloaded, Unavailable, build_fastapi, settings_from_config
from serve.models import model_card, pin_model

log = logging.getLogger("omnidiff.serve")

# Env vars a replica needs to find the model: the registry, and the project's model cache.
_REPLICA_ENV = ("MLFLOW_TRACKING_URI", "OMNIDIFF_HOME", "OMNIDIFF_MODELS", "HF_HOME", "HF_HUB_OFFLINE",
                "TRANSFORMERS_OFFLINE")


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

    A job is ``{"prompt", "negative_prompt", "n", "steps", "guidance_scale", "width", "height", "seeds"}``
    (width/height None: the model's own size); the answer is
    ``{"images": [png bytes], "seconds", "batch_size", "model", "version", "size"}``.
    """

    def __init__(self, pinned: dict[str, Any], batching: dict[str, Any], sizes: list[str], torch_threads: int,
                 device: str, sampling_nice: int = 0, precision: dict[str, Any] | None = None):
        import torch

        self.sampling_nice = sampling_nice
        self._thread_state = threading.local()  # made here: the class travels by value to the replica
        if torch_threads:
            torch.set_num_threads(torch_threads)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.pinned = pinned
        folder = Path(pinned["ref"])
        if not folder.is_dir():  # a registry ref: resolve it here, on this replica's node
            from omnidiff.tracking import resolve_model

            folder = Path(resolve_model(pinned["ref"]))
        from omnidiff.pipeline import load_any_pipeline

        # An export, or a published SD / SDXL folder served as the baseline through diffusers' own pipeline.
        precision = dict(precision or {})
        dtype = precision.pop("dtype", "auto")
        dtype = ("float16" if device.startswith("cuda") else "float32") if dtype == "auto" else dtype
        try:
            self.pipe = load_any_pipeline(folder, device=device, dtype=getattr(torch, dtype), **precision)
        except ValueError as exc:
            raise ConfigError(f"{pinned['source']}: {exc}") from None
        # One step at every allowed size: a size this model cannot make fails the deployment here,
        # with its name, instead of as a 500 on some later request; and first-call costs are paid now.
        for size in [None, *sizes]:
            width, height = parse_size(size) if size else (None, None)
            try:
                self.pipe(["warm-up"], num_inference_steps=1, guidance_scale=2.0, seed=0, height=height, width=width)
            except ValueError as exc:
                raise ConfigError(f"size {size!r} (its card's or limits.sizes) does not work with {pinned['source']}: "
                                  f"{exc}") from None
        self.card_data = model_card(pinned, folder)
        self.batching = bool(batching["enabled"])
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

    # The sizes here are placeholders: __init__ sets the configured ones.
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_images_in)
    async def _batched(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        # In a thread: the replica's event loop keeps accepting (and batching) requests meanwhile.
        return await asyncio.to_thread(self._sample, jobs)

    def _sample(self, jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One sampling loop per distinct (steps, guidance, size) in the batch; prompts, negative
        prompts and seeds are per image, so mixing them never changes an image."""
        if self.sampling_nice and not getattr(self._thread_state, "niced", False):
            # This thread yields the CPU to the proxy and the ingress: when the cores are saturated,
            # health checks and 503s still answer promptly. (Torch's own pool threads, when
            # torch_threads > 1, keep their priority; Ray gives a 1-CPU replica one thread.)
            os.setpriority(os.PRIO_PROCESS, 0, min(19, os.getpriority(os.PRIO_PROCESS, 0) + self.sampling_nice))
            self._thread_state.niced = True
        groups: OrderedDict[tuple, list[int]] = OrderedDict()
        for i, job in enumerate(jobs):
            key = (job["steps"], job["guidance_scale"], job["width"], job["height"])
            groups.setdefault(key, []).append(i)
        results: list[dict[str, Any]] = [{} for _ in jobs]
        for (steps, guidance, width, height), members in groups.items():
            prompts = [jobs[i]["prompt"] for i in members for _ in range(jobs[i]["n"])]
            negatives = [jobs[i]["negative_prompt"] or "" for i in members for _ in range(jobs[i]["n"])]
            seeds = [s for i in members for s in jobs[i]["seeds"]]
            t0 = time.perf_counter()
            images = self.pipe(
                prompts,
                negative_prompt=negatives,
                num_inference_steps=steps,
                guidance_scale=guidance,
                seed=seeds,
                height=height,
                width=width,
            )
            seconds = time.perf_counter() - t0
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


class HandleBackend:
    """The generator deployment behind a Serve handle, with Serve's errors mapped to ours, and admission.

    Admission (serve/admission.py) happens here, before the handle is asked: a request is priced in
    pixel-steps and refused with :class:`Overloaded` (503, ``Retry-After`` from the measured drain
    rate) when the work already admitted plus its own would pass ``budget.max_work``, or when
    ``capacity`` requests (what the generators hold plus the bounded queue) are in flight. Serve's
    ``max_queued_requests`` on the handle stays the authority on the count; answering here first
    skips the router work and its per-rejection warning log, so the 503 stays quick when the box is
    busiest. A request of the model's own size (``width`` None) is priced at the largest allowed size
    until a finished request has shown the model's size.
    """

    def __init__(self, handle, capacity: int | None = None, budget: WorkBudget | None = None,
                 sizes: tuple[str, ...] = ()):
        self.handle = handle
        self.budget = budget or WorkBudget(max_work=2**62, max_requests=capacity)
        self.native_size: tuple[int, int] | None = None
        self.largest_size = max((parse_size(s) for s in sizes), key=lambda wh: wh[0] * wh[1], default=(64, 64))
        self.smallest_pixels = min((w * h for w, h in map(parse_size, sizes)), default=1)
        self.requests = 0  # generation requests inside the ingress now, whatever their stage (see ``gate``)

    @contextlib.contextmanager
    def gate(self):
        """The first admission check, before the request's body is read (http_api's load shedding).

        Yields an :class:`Overloaded` when no request could be admitted now, whatever it asks (the
        request count is at capacity, counting requests still being read; or the queued work leaves no
        room for the cheapest request), else None; the request counts as inside the ingress until
        the ``with`` block ends. Answering these from the scope alone, without waiting for the body
        (which the replica fetches from Serve's proxy), keeps a burst's 503s quick.
        """
        smallest = min(self.smallest_pixels, self.native_size[0] * self.native_size[1]) if self.native_size \
            else self.smallest_pixels
        refused = self.budget.refusal(job_cost(1, 1, smallest, 1), requests=self.requests)
        if refused is not None:
            yield Overloaded(str(refused), refused.retry_after_s)
            return
        self.requests += 1
        try:
            yield None
        finally:
            self.requests -= 1

    @property
    def in_flight(self) -> int:
        return self.budget.in_flight

    def cost(self, job: dict[str, Any]) -> int:
        if job["width"] is not None and job["height"] is not None:
            width, height = job["width"], job["height"]
        else:
            width, height = self.native_size or self.largest_size
        return job_cost(job["n"], job["steps"], width, height)

    async def _call(self, method: str, *args, timeout_s: float | None = None):
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

        try:
            response = getattr(self.handle, method).remote(*args)
            if timeout_s is None:
                return await response
            return await asyncio.wait_for(response, timeout_s)
        except BackPressureError as exc:
            raise Overloaded(str(exc), self.budget.seconds_to_drain(self.budget.queued_work)) from None
        except DeploymentUnavailableError as exc:
            raise Unavailable(str(exc)) from None
        except TimeoutError:
            raise Unavailable(f"the generator did not answer within {timeout_s}s") from None

    async def generate(self, job: dict[str, Any]) -> dict[str, Any]:
        try:
            ticket = self.budget.admit(self.cost(job))  # one event loop: no lock needed
        except Overbudget as exc:
            raise Overloaded(str(exc), exc.retry_after_s) from None
        finished = False
        try:
            result = await self._call("generate", job)
            finished = True
        finally:
            self.budget.release(ticket, finished)
        if job["width"] is None and self.native_size is None:
            self.native_size = parse_size(result["size"])
        return result

    async def card(self, timeout_s: float) -> dict[str, Any]:
        return await self._call("card", timeout_s=timeout_s)


@serve.deployment(name="ImageAPI")
@serve.ingress()
class ImageAPIDeployment:
    """The HTTP ingress; its FastAPI app is built on the replica (``__serve_build_asgi_app__``)."""

    def __init__(self, generator, settings: ApiSettings):
        admission = settings.admission or {}
        budget = WorkBudget(max_work=admission.get("max_queued_work", 2**62), max_requests=settings.capacity,
                            fallback_retry_after_s=settings.retry_after_s,
                            max_retry_after_s=admission.get("max_retry_after_s", 120),
                            window_s=admission.get("throughput_window_s", 60.0))
        self.backend = HandleBackend(generator, budget=budget, sizes=tuple(settings.sizes or settings.limits.get("sizes") or ()))
        self.settings = settings

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self.settings, self.backend)


# ----------------------------------------------------------------------------- build / run


def api_settings(cfg: ServeConfig, pinned: dict[str, Any]) -> ApiSettings:
    """The ingress's settings for ``cfg`` serving ``pinned`` (the token read now, only its hash kept)."""
    token = auth.load_token(cfg.auth.token_env, cfg.auth.token_file)
    if token is None and cfg.auth.require_token:
        raise ConfigError(f"auth.require_token=True: no token in ${cfg.auth.token_env} or auth.token_file={cfg.auth.token_file}")
    return settings_from_config(cfg, auth.token_digest(token) if token else None, pinned)


def edge_policy(cfg: ServeConfig, settings: ApiSettings) -> edge.EdgePolicy:
    """What Serve's proxy needs to admit this app's generation requests itself (serve/edge.py): the
    whole work budget (every ingress replica's share) and the ingress's pricing."""
    limits = settings.limits
    return edge.EdgePolicy(
        app=cfg.app_name, route_prefix=cfg.route_prefix, token_digest=settings.token_digest,
        allowed_hosts=tuple(h.lower() for h in settings.allowed_hosts), default_steps=limits["default_steps"],
        max_steps=limits["max_steps"], max_n=limits["max_n"], max_body_bytes=limits["max_body_bytes"],
        sizes=tuple(settings.sizes or limits.get("sizes") or ()), native_size=settings.native_size,
        unsupported_size=settings.unsupported_size, max_work=cfg.admission.max_queued_work,
        max_requests=settings.capacity, fallback_retry_after_s=settings.retry_after_s,
        max_retry_after_s=cfg.admission.max_retry_after_s, throughput_window_s=cfg.admission.throughput_window_s)


def build_app(cfg: ServeConfig, pinned: dict[str, Any] | None = None, settings: ApiSettings | None = None):
    """The bound Serve application for ``cfg`` (model pinned now unless given; token read now, only its hash kept)."""
    pinned = pinned or pin_model(cfg)
    settings = settings or api_settings(cfg, pinned)
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
        # Its calls come from the ingress, which logs every HTTP request already.
        logging_config={"enable_access_log": False},
        **scaling,
    ).bind(pinned, to_dict(cfg.batching), list(pinned["sizes"]), cfg.torch_threads, cfg.device, cfg.sampling_nice,
           {"dtype": cfg.dtype, "vae_slicing": cfg.vae_slicing, "vae_tiling": cfg.vae_tiling})
    # The ingress only parses and forwards: no CPU reservation, and it must never be the bottleneck,
    # so its own queue is effectively unbounded (the bounded one is the generator's).
    ingress = ImageAPIDeployment.options(
        num_replicas=cfg.ingress_replicas,
        max_ongoing_requests=10_000,
        ray_actor_options={"num_cpus": 0, "runtime_env": {"env_vars": env_vars}},
        max_surge_percent=cfg.rollout_surge_percent,
    )
    return ingress.bind(generator, settings)


def base_url(cfg: ServeConfig, port: int | None = None) -> str:
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    return f"http://{host}:{port or cfg.port}{cfg.route_prefix.rstrip('/')}"


def start_serve(cfg: ServeConfig) -> None:
    """Connect to Ray and make sure Serve's HTTP proxy listens on ``cfg.host:cfg.port``."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    # Slow and oversized clients are refused in the proxy (serve/http_guard.py): its startup hook and
    # limits travel as the controller's env vars, which the proxy actors it starts inherit.
    guard = http_guard.GuardLimits(header_timeout_s=cfg.http.header_timeout_s, body_timeout_s=cfg.http.body_timeout_s,
                                   max_header_count=cfg.http.max_header_count,
                                   max_header_bytes=cfg.http.max_header_bytes)
    # With admission.edge the proxy also admits generation requests itself, from the policies that
    # ``run`` publishes in a folder named after the port (serve/edge.py).
    edge_dir = str(edge.edge_dir(cfg.port)) if cfg.admission.edge else None
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "keep_alive_timeout_s": cfg.http.keep_alive_timeout_s},
                proxy_location="HeadOnly",
                controller_options={"runtime_env": {"env_vars": http_guard.proxy_env(guard, edge_dir)}})
    # A Ray cluster has one Serve HTTP proxy: when Serve was already up, serve.start kept its
    # host/port and only logged a warning, and the app would be reachable somewhere else than
    # asked. Say so instead of waiting for /readyz on a port nobody listens on.
    from ray.serve.context import _get_global_client

    live = _get_global_client().http_config
    if (live.host, int(live.port)) != (cfg.host, int(cfg.port)):
        apps = ", ".join(sorted(serve.status().applications)) or "none"
        raise ConfigError(
            f"port={cfg.port} (host={cfg.host}): Ray Serve in this cluster already listens on "
            f"{live.host}:{live.port} (apps: {apps}), and a cluster has one Serve HTTP address; "
            f"deploy with host={live.host} port={live.port}, or delete those apps first (omnidiff serve down)"
        )


def run(cfg: ServeConfig, wait_ready_s: float = 300.0) -> dict[str, Any]:
    """Deploy (or roll) the app named ``cfg.app_name``; returns ``{"url", "model", "app"}`` once ready."""
    start_serve(cfg)
    pinned = pin_model(cfg)
    settings = api_settings(cfg, pinned)
    # Withdrawn first: during a roll the old policy must not price the new version's requests.
    edge.withdraw(edge.edge_dir(cfg.port), cfg.app_name)
    serve.run(build_app(cfg, pinned, settings), name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False)
    if cfg.admission.edge:
        edge.publish(edge.edge_dir(cfg.port), edge_policy(cfg, settings))
    url = base_url(cfg)
    wait_ready(url, wait_ready_s)
    result = {"url": url, "app": cfg.app_name, "model": pinned, "config": to_dict(cfg)}
    supervisor.write_json(_state_file(cfg.app_name), result)
    return result


def _state_file(app_name: str) -> Path:
    return subdir("serve") / f"{app_name}.json"


def running(app_name: str) -> dict[str, Any] | None:
    """What ``run`` last deployed as ``app_name`` (url, pinned model, config), or None."""
    return supervisor.read_json(_state_file(app_name))


def forget(app_name: str) -> None:
    _state_file(app_name).unlink(missing_ok=True)


def wait_ready(url: str, timeout_s: float) -> dict[str, Any]:
    import requests

    last = "no answer"

    def ready() -> dict[str, Any] | None:
        nonlocal last
        try:
            answer = requests.get(f"{url}/readyz", timeout=5)
            if answer.status_code == 200:
                return answer.json()
            last = f"{answer.status_code} {answer.text[:200]}"
        except requests.RequestException as exc:
            last = str(exc)
        return None

    found = supervisor.wait_until(ready, timeout_s, interval_s=0.5)
    if found is None:
        raise TimeoutError(f"{url}/readyz not ready after {timeout_s}s: {last}")
    return found


def shutdown(cfg: ServeConfig) -> None:
    """Delete the app; stop Serve altogether when no other app is left."""
    from omnidiff.stack import ensure_ray

    ensure_ray()
    serve.delete(cfg.app_name)
    edge.withdraw(edge.edge_dir(cfg.port), cfg.app_name)
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
