"""What OpenAI clients send, the sizes a model supports, and what /v1/models shows to whom (issue 15 items 4, 6, 7).

    .venv/bin/pytest tests/test_serve_openai.py -x -q

The e2e tests call the real Ray Serve app of tests/fixtures_serve.py (``served``: the tiny test model,
made at 16x16, whose card lists 16x16 and three example prompts, behind a bearer token). The last
test builds the same FastAPI app in-process on a real pipeline (``openai.unsupported_size=native``
needs another config than the served app's; starting a second Serve app costs a replica).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import tempfile
from pathlib import Path

import pytest
import requests
from PIL import Image

from omnidiff.env import home
from tests.fixtures_serve import EXAMPLE_PROMPTS, MODEL_NAME


def _size(b64: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def _client(served, api_key=None):
    import openai

    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=api_key or served.token, max_retries=0, timeout=120)


@pytest.mark.e2e
def test_openai_client_with_what_tools_send_by_habit(served):
    client = _client(served)
    # The client's own defaults (only a prompt) and the model names, qualities and styles tools send.
    assert _size(client.images.generate(prompt="一个红色的圆").data[0].b64_json) == (16, 16)
    for model, quality, style in (("dall-e-3", "hd", "vivid"), ("dall-e-2", "standard", "natural"),
                                  ("gpt-image-1", "high", None), (f"{MODEL_NAME}@production", "auto", None)):
        kwargs = {"style": style} if style else {}
        result = client.images.generate(prompt="a small red circle", model=model, quality=quality, size="auto",
                                        response_format="b64_json", output_format="png", background="opaque",
                                        **kwargs)
        assert _size(result.data[0].b64_json) == (16, 16), model
    # quality is ignored, not mapped: same seed-free request shape, same default steps (no slower "hd").
    native = requests.post(f"{served.url}/v1/images/generations", headers=served.headers, timeout=120,
                           json={"prompt": "x", "quality": "max", "style": "vivid", "model": "gpt-image-2"})
    assert native.status_code == 200, native.text


@pytest.mark.e2e
def test_a_size_the_model_does_not_support_is_a_400_naming_the_supported_ones(served):
    import openai

    with pytest.raises(openai.BadRequestError) as bad:
        _client(served).images.generate(prompt="a red circle", size="1024x1024")  # what OpenAI tools send by habit
    assert bad.value.param == "size" and bad.value.code == "unsupported_size"
    assert "'1024x1024'" in bad.value.message and "16x16" in bad.value.message
    for size in ("32x32", "64x64", "1024x1024"):
        answer = requests.post(f"{served.url}/v1/generate", headers=served.headers, timeout=60,
                               json={"prompt": "a red circle", "size": size, "steps": 1})
        assert answer.status_code == 400, (size, answer.text)
        error = answer.json()["error"]
        assert error["param"] == "size" and error["message"].startswith(f"size: '{size}'")
        assert "supported sizes: 16x16, or 'auto' (the model's own, 16x16)" in error["message"]
    ok = requests.post(f"{served.url}/v1/generate", headers=served.headers, timeout=120,
                       json={"prompt": "a red circle", "size": "16x16", "steps": 1})
    assert ok.status_code == 200 and ok.json()["size"] == "16x16"


def _secrets_of(full: dict) -> list[str]:
    """What only the token holder may see: the source reference and every lineage value (run ids, paths...)."""
    values = [full["source"], *full["lineage"].values()]
    return [v for v in values if len(v) >= 4]


@pytest.mark.e2e
def test_models_shows_names_sizes_and_examples_without_the_token_and_the_card_with_it(served):
    full = requests.get(f"{served.url}/v1/models", headers=served.headers, timeout=10).json()["data"][0]
    assert full["lineage"]["run_id"] and full["source"].startswith("models:/")
    assert full["sizes"] == ["16x16"] and full["native_size"] == "16x16"
    assert full["example_prompts"] == EXAMPLE_PROMPTS

    public = requests.get(f"{served.url}/v1/models", timeout=10)
    assert public.status_code == 200
    card = public.json()["data"][0]
    assert set(card) == {"id", "object", "created", "owned_by", "version", "alias", "aliases", "conditioning", "sizes",
                         "native_size", "example_prompts"}
    assert card["id"] == MODEL_NAME and card["version"] == full["version"] and card["alias"] == "production"
    assert card["aliases"] == [MODEL_NAME, f"{MODEL_NAME}/{full['version']}", f"{MODEL_NAME}@production",
                               *served.cfg.openai.model_aliases]
    assert card["sizes"] == ["16x16"] and card["example_prompts"] == EXAMPLE_PROMPTS
    # Nothing of the server's paths, run ids or flow-run ids, on any page open without the token.
    for path in ("/v1/models", "/readyz", "/", "/openapi.json"):
        text = requests.get(f"{served.url}{path}", timeout=10).text
        leaked = [s for s in _secrets_of(full) if s in text]
        assert not leaked, (path, leaked)
        machine_roots = {tempfile.gettempdir(), str(Path.home()), str(home())}  # where this server's paths live
        assert not [root for root in machine_roots if f'"{root}' in text] and "runs:/" not in text, path
    # The OpenAI client lists the model with its key (the full card).
    listed = _client(served).models.list()
    assert [m.id for m in listed.data] == [MODEL_NAME]
    import openai

    with pytest.raises(openai.AuthenticationError):
        _client(served, api_key="wrong").models.list()


# ----------------------------------------------------------------------------- in-process: unsupported_size=native


class PipelineBackend:
    """The app's generator seam (serve.http_api.GenerationBackend) on a real pipeline, in this process."""

    def __init__(self, pipe, card: dict):
        self.pipe, self.card_data, self.jobs = pipe, card, []

    async def generate(self, job: dict) -> dict:
        self.jobs.append(job)
        images = self.pipe([job["prompt"]] * job["n"], num_inference_steps=job["steps"], seed=job["seeds"],
                           guidance_scale=job["guidance_scale"], height=job["height"], width=job["width"])
        pngs = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            pngs.append(buffer.getvalue())
        return {"images": pngs, "seconds": 0.0, "batch_size": job["n"], "model": self.card_data["id"],
                "version": None, "size": "{}x{}".format(*images[0].size)}

    async def card(self, timeout_s: float) -> dict:
        return self.card_data


def test_unsupported_size_native_draws_at_the_models_own_size(serve_pipelines, tiny_llm):
    import httpx
    import openai

    from omnidiff.config import load_config
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.pipeline import OmniDiffusionPipeline
    from serve.config import ServeConfig
    from serve.http_api import build_fastapi, settings_from_config
    from serve.models import model_card, pin_model

    folder = serve_pipelines[0]
    cfg = load_config(ServeConfig, None, [f"model={folder}", "openai.unsupported_size=native",
                                          "openai.model_aliases=['dall-e-3']", "limits.default_steps=2"])
    pinned = pin_model(cfg)
    assert pinned["sizes"] == ["16x16"] and pinned["example_prompts"] == EXAMPLE_PROMPTS
    pipe = OmniDiffusionPipeline.from_pretrained(folder, llm=LLMTextEncoder(tiny_llm))
    backend = PipelineBackend(pipe, model_card(pinned, folder))
    app = build_fastapi(settings_from_config(cfg, None, pinned), backend)

    async def calls():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http:
            client = openai.AsyncOpenAI(base_url="http://127.0.0.1/v1", api_key="none", http_client=http, max_retries=0)
            mapped = await client.images.generate(prompt="a red circle", model="dall-e-3", size="1024x1024",
                                                  quality="hd")
            native = await http.post("/v1/generate", json={"prompt": "a red circle", "size": "1024x1024"})
            bad = await http.post("/v1/images/generations", json={"prompt": "a red circle", "size": "big"})
            models = await http.get("/v1/models")
            return mapped, native, bad, models

    mapped, native, bad, models = asyncio.run(calls())
    assert _size(mapped.data[0].b64_json) == (16, 16)
    assert (backend.jobs[0]["width"], backend.jobs[0]["height"]) == (None, None)  # as size=auto
    # The native route never maps: 400 naming the sizes; nonsense stays a 400 on the OpenAI route too.
    assert native.status_code == 400 and "supported sizes: 16x16" in native.json()["error"]["message"]
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "size"
    assert len(backend.jobs) == 1
    # No token configured: the public card only, here too (the folder's absolute path is the source).
    assert models.status_code == 200 and str(folder) not in models.text and "lineage" not in json.loads(models.text)["data"][0]
