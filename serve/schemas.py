"""Request and response bodies of the serving API (they are the OpenAPI spec).

Request models are built from the serve config's limits (:func:`request_models`), so the
published spec states the real bounds (``maxLength`` of a prompt, the allowed sizes, ...).
They are strict: a string where a number belongs, an unknown field or a value out of range
is a 400 that names the field; nothing is silently coerced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator

from serve.config import LimitsConfig

SEED_MAX = 2**32 - 1


def _integral(value: Any) -> Any:
    """JSON Schema counts 5.0 as an integer, so we do too; strings and booleans stay errors."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


def _check_text(value: str | None) -> str | None:
    """Reject text the tokenizers cannot take: lone surrogates (valid JSON escapes, invalid Unicode)."""
    if value is None:
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (contains a lone surrogate)") from None
    return value


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, naming the field when one is at fault.")
    type: str = Field(description="invalid_request_error | authentication_error | server_overloaded | not_ready | ...")
    param: str | None = Field(default=None, description="The request field at fault, if any.")
    code: str | None = Field(default=None, description="A machine-readable reason.")


class ErrorResponse(BaseModel):
    """Every error, in the OpenAI API's shape."""

    error: ErrorDetail


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The PNG, base64 encoded (response_format=b64_json).")
    url: str | None = Field(default=None, description="A data: URL of the PNG (response_format=url).")
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    """The OpenAI Images API response."""

    created: int = Field(description="Unix time of the response.")
    data: list[ImageData]


class GenerateResponse(BaseModel):
    """The native response with base64 images (response_format=json)."""

    model: str = Field(description="Served model id.")
    version: str | None = Field(description="Registry version of the served model (None for a folder).")
    images: list[str] = Field(description="PNG images, base64 encoded.")
    seeds: list[int] = Field(description="The seed of each image; resend one to get the same image.")
    size: str
    steps: int
    guidance_scale: float
    seconds: float = Field(description="Time spent in the sampling loop (the whole batch).")
    batch_size: int = Field(description="Images in the sampling loop this request shared.")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model: str | None = None
    version: str | None = None


class ExamplePrompt(BaseModel):
    prompt: str
    lang: str | None = None


class ModelCard(BaseModel):
    """The served model. ``source`` and ``lineage`` are shown only to a request with the server's token."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "omnidiff"
    version: str | None = Field(default=None, description="Registry version, None when served from a folder.")
    alias: str | None = Field(default=None, description="The registry alias it was resolved from.")
    aliases: list[str] = Field(default_factory=list, description="Every name the `model` field of a request may use.")
    conditioning: str | None = Field(default=None, description="llm_adapter (ours), clip (the tiny base model) or "
                                     "base (a published SD / SDXL folder, run by diffusers' own pipeline).")
    languages: list[str] | None = Field(default=None, description="The prompt languages it reads, where it is limited "
                                        "(a published base: en).")
    note: str | None = Field(default=None, description="What a user should know before prompting it.")
    sizes: list[str] = Field(default_factory=list, description="The WIDTHxHEIGHT sizes a request may ask for.")
    native_size: str | None = Field(default=None, description="The size it was trained at (size 'auto').")
    example_prompts: list[ExamplePrompt] = Field(
        default_factory=list, description="Prompts of the kind it was trained on (from its training data)."
    )
    source: str | None = Field(default=None, description="The reference it was resolved from (registry ref or folder).")
    lineage: dict[str, str] | None = Field(
        default=None,
        description="run ids, snapshot digest, cache fingerprint, parent model, stage, ... (registry tags + lineage.json).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


@dataclass(frozen=True)
class RequestModels:
    images: type[BaseModel]
    generate: type[BaseModel]


SIZE_PATTERN = r"^(auto|[1-9][0-9]{0,4}x[1-9][0-9]{0,4})$"
# What OpenAI clients may send and this server ignores (serve.config.OpenAIConfig says why).
OPENAI_QUALITIES = ("auto", "standard", "hd", "low", "medium", "high", "xhigh", "max")
OPENAI_STYLES = ("vivid", "natural")


def request_models(limits: LimitsConfig, model_ids: tuple[str, ...] = (), sizes: tuple[str, ...] | None = None,
                   openai_any_size: bool = False) -> RequestModels:
    """The two request bodies with ``limits`` (and the served model's ids and sizes) written into their constraints.

    ``model_ids`` empty: any model string passes the schema (the ingress checks it). ``sizes``: the
    served sizes (default ``limits.sizes``; neither known: any WIDTHxHEIGHT passes the schema).
    ``openai_any_size``: the OpenAI route takes any WIDTHxHEIGHT (``openai.unsupported_size=native``).
    """
    # pattern \S (JSON Schema: "contains"): a prompt of only whitespace says nothing.
    Prompt = Annotated[str, Field(min_length=1, max_length=limits.max_prompt_chars, pattern=r"\S")]
    sizes = tuple(sizes) if sizes else tuple(limits.sizes or ())
    AnySize = Annotated[str, Field(pattern=SIZE_PATTERN)]
    Size = Literal[sizes + ("auto",)] if sizes else AnySize  # type: ignore[valid-type]
    OpenAISize = AnySize if openai_any_size else Size
    listed = f"one of {list(sizes)}" if sizes else "a size the model supports (GET /v1/models)"
    Model = Literal[model_ids] if model_ids else Annotated[str, Field(max_length=256)]  # type: ignore[valid-type]
    strict = ConfigDict(strict=True, extra="forbid")

    class ImagesGenerationRequest(BaseModel):
        """POST /v1/images/generations: the OpenAI Images API request (the fields this server honours)."""

        model_config = strict

        prompt: Prompt = Field(description=f"What to draw, in any language; at most {limits.max_prompt_chars} characters.")
        model: Model | None = Field(default=None, description="The served model (GET /v1/models), or omitted.")
        n: Int = Field(default=1, ge=1, le=limits.max_n, description="Number of images.")
        size: OpenAISize | None = Field(  # type: ignore[valid-type]
            default=None,
            description=f"WIDTHxHEIGHT, {listed}, or 'auto' (the model's own size)"
            + ("; any other size is drawn at the model's own size." if openai_any_size else "."),
        )
        response_format: Literal["b64_json", "url"] | None = Field(
            default=None, description="b64_json (default) or url (a data: URL; no files are hosted)."
        )
        quality: Literal[OPENAI_QUALITIES] | None = Field(  # type: ignore[valid-type]
            default=None, description="Accepted and ignored: the route samples the server's default steps."
        )
        style: Literal[OPENAI_STYLES] | None = Field(default=None, description="Accepted and ignored.")  # type: ignore[valid-type]
        output_format: Literal["png"] | None = Field(default=None, description="png only.")
        background: Literal["auto", "opaque"] | None = Field(default=None, description="The images are opaque.")
        user: str | None = Field(default=None, max_length=256, description="End-user id (accepted, not stored).")

        _text = field_validator("prompt", "user")(_check_text)

    class GenerateRequest(BaseModel):
        """POST /v1/generate: the native request with every sampling knob."""

        # The spec says what the handler enforces: one PNG per response.
        model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra={
            "if": {"properties": {"response_format": {"const": "png"}}, "required": ["response_format"]},
            "then": {"properties": {"n": {"const": 1}}},
        })

        prompt: Prompt = Field(description=f"What to draw, in any language; at most {limits.max_prompt_chars} characters.")
        negative_prompt: str | None = Field(
            default=None, max_length=limits.max_prompt_chars, description="What to steer away from."
        )
        n: Int = Field(default=1, ge=1, le=limits.max_n, description="Number of images.")
        steps: Int = Field(default=limits.default_steps, ge=1, le=limits.max_steps, description="Sampling steps.")
        guidance_scale: float = Field(
            default=limits.default_guidance_scale,
            ge=0.0,
            le=limits.max_guidance_scale,
            allow_inf_nan=False,
            description="Classifier-free guidance scale.",
        )
        # Bounds inside the Annotated, before the validator: otherwise pydantic writes them into the spec
        # of an Optional as bogus "ge"/"le" keys, and fuzzers send negative seeds (found by the fuzz test).
        seed: Annotated[int, Field(ge=0, le=SEED_MAX), BeforeValidator(_integral)] | None = Field(
            default=None, description="Image i uses seed + i; random if omitted."
        )
        size: Size | None = Field(default=None, description=f"WIDTHxHEIGHT, {listed}, or 'auto' (the model's own size).")  # type: ignore[valid-type]
        response_format: Literal["json", "png"] = Field(
            default="json", description="json: base64 PNGs in JSON; png: the image itself (needs n=1)."
        )

        _text = field_validator("prompt", "negative_prompt")(_check_text)

    return RequestModels(images=ImagesGenerationRequest, generate=GenerateRequest)
