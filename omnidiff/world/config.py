"""WorldConfig: what tiny world to generate (kind ``world``, configs/world.yaml).

    omnidiff world generate --config configs/world.yaml seed=1 num_captions=200
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from pydantic import Field, model_validator

from omnidiff import env
from omnidiff.config import ConfigModel, require
from omnidiff.world.attributes import ATTRIBUTES
from omnidiff.world.captions import (
    CLIP_WINDOW,
    LANGUAGES,
    NUM_TEMPLATES,
    TRAINED_LANGUAGES,
    ZERO_SHOT_LANGUAGES,
    max_filler_tokens,
)


def split_quota(total: int, weights: dict[str, float]) -> dict[str, int]:
    """``total`` split by ``weights`` into integers that sum to ``total`` (largest remainder, stable order)."""
    norm = sum(weights.values())
    exact = {key: total * w / norm for key, w in weights.items()}
    counts = {key: int(v) for key, v in exact.items()}
    by_remainder = sorted(weights, key=lambda key: (-(exact[key] - counts[key]), list(weights).index(key)))
    for key in by_remainder[: total - sum(counts.values())]:
        counts[key] += 1
    return counts


def _default_languages() -> dict[str, float]:
    return {"en": 0.4, "zh": 0.14, "ja": 0.12, "es": 0.12, "de": 0.11, "fr": 0.11}


class WorldConfig(ConfigModel):
    """A seeded tiny world: images, multilingual captions, parallel texts and eval prompts.

    name: folder name under ``$OMNIDIFF_HOME/world/`` when ``out_dir`` is not set.
    seed: the only source of randomness; same config -> byte-identical files.
    out_dir: where to write (default ``$OMNIDIFF_HOME/world/<name>``).
    num_captions: distinct caption draws (attributes + language + phrasing) of the training pairs.
    images_per_caption: images drawn for each caption (same attributes, own jitter/quality); the
        pair count is num_captions * images_per_caption. More than one keeps the number of
        distinct texts, and so the cost of LLM embedding, down.
    image_size: side of the served PNGs in pixels (models train at 16 after img2dataset resizes).
    supersample: shapes are drawn this many times larger and box-filtered down (anti-aliasing).
    jitter: largest random shift of a shape's centre, as a fraction of the image side.
    languages: share of training captions per trained language (sums to 1).
    long_fraction: share of long captions (decisive attributes after CLIP's 77 tokens), per language.
    long_min_prefix_tokens: English CLIP-style tokens of filler before the attributes (>= 77).
    degraded_fraction: share of images rendered degraded (blur, wash-out, noise): what an
        aesthetic scorer should find.
    heldout_combos: "shape/colour" pairs never drawn for training; they appear in eval prompts.
    heldout_templates: phrasing indices (in every language) never used for training.
    num_parallel: text-only parallel pairs (a trained non-English language + its English), stage 1.
    parallel_lexicon: also every attribute word of each non-English trained language with its English, in the
        form a dictionary lists it (``captions.lexicon``): 23 word pairs a language, beside the sentences. Off by
        default: measured without gain (benchmarks/zero_shot_ablation.md, session 15).
    num_paraphrases: more text-only pairs for stage 1, spread over every trained language (English too: its
        text is its own English), each in one of ``captions.NUM_PARAPHRASES`` phrasings that no training caption
        and no eval prompt uses (``captions.paraphrase``): a parallel corpus has more ways to say a thing than
        the captions' templates, and the held-out eval phrasing is none of them.
    eval_specs: prompts per eval language (each spec is rendered in every eval language).
    eval_long_fraction: share of long eval prompts.
    eval_languages: languages of the eval prompts (trained and zero-shot).
    """

    kind: ClassVar[str] = "world"

    name: str = Field("default", pattern=r"^[^/.][^/]*$")  # a plain folder name
    seed: int = Field(0, ge=0)
    out_dir: Path | None = None
    num_captions: int = Field(1500, ge=1)
    images_per_caption: int = Field(2, ge=1)
    image_size: int = Field(32, ge=8, le=512)
    supersample: int = Field(4, ge=1, le=16)
    jitter: float = Field(0.03, ge=0.0, le=0.1)  # a fraction of the side
    languages: dict[str, float] = Field(default_factory=_default_languages, min_length=1)
    long_fraction: float = Field(0.2, ge=0.0, le=1.0)
    long_min_prefix_tokens: int = 80
    degraded_fraction: float = Field(0.3, ge=0.0, le=1.0)
    heldout_combos: tuple[str, ...] = (
        "circle/green", "square/purple", "triangle/orange", "cross/blue", "diamond/red",
    )  # fmt: skip
    heldout_templates: tuple[int, ...] = (4,)
    num_parallel: int = 2000
    parallel_lexicon: bool = False
    num_paraphrases: int = Field(0, ge=0)
    eval_specs: int = Field(32, ge=0)
    eval_long_fraction: float = Field(0.25, ge=0.0, le=1.0)
    eval_languages: tuple[str, ...] = LANGUAGES

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        for lang, share in self.languages.items():
            require(lang not in ZERO_SHOT_LANGUAGES, f"languages.{lang}", share,
                    f"{lang} is a zero-shot language: eval prompts only, never training data")  # fmt: skip
            require(lang in TRAINED_LANGUAGES, f"languages.{lang}", share,
                    f"unknown trained language; expected one of {list(TRAINED_LANGUAGES)}")  # fmt: skip
            require(share > 0, f"languages.{lang}", share, "share must be > 0 (leave the language out instead)")
        total = sum(self.languages.values())
        require(abs(total - 1.0) < 1e-6, "languages", self.languages, f"shares must sum to 1 (they sum to {total})")
        require(CLIP_WINDOW <= self.long_min_prefix_tokens <= max_filler_tokens(), "long_min_prefix_tokens",
                self.long_min_prefix_tokens, f"must be in [{CLIP_WINDOW}, {max_filler_tokens()}]: the attributes "
                "must start past CLIP's window and the fillers must be long enough")  # fmt: skip
        for i, combo in enumerate(self.heldout_combos):
            shape, _, colour = combo.partition("/")
            require(shape in ATTRIBUTES["shape"] and colour in ATTRIBUTES["colour"], f"heldout_combos[{i}]", combo,
                    f"expected 'shape/colour' with shape in {list(ATTRIBUTES['shape'])} and colour in "
                    f"{list(ATTRIBUTES['colour'])}")  # fmt: skip
        require(len(set(self.heldout_combos)) == len(self.heldout_combos), "heldout_combos", self.heldout_combos,
                "has duplicates")  # fmt: skip
        for shape in ATTRIBUTES["shape"]:
            held = sum(c.partition("/")[0] == shape for c in self.heldout_combos)
            require(held < len(ATTRIBUTES["colour"]), "heldout_combos", self.heldout_combos,
                    f"holds out every colour of {shape}: the shape would never be seen")  # fmt: skip
        for colour in ATTRIBUTES["colour"]:
            held = sum(c.partition("/")[2] == colour for c in self.heldout_combos)
            require(held < len(ATTRIBUTES["shape"]), "heldout_combos", self.heldout_combos,
                    f"holds out every shape of {colour}: the colour would never be seen")  # fmt: skip
        for i, t in enumerate(self.heldout_templates):
            require(0 <= t < NUM_TEMPLATES, f"heldout_templates[{i}]", t, f"must be in [0, {NUM_TEMPLATES})")
        require(len(set(self.heldout_templates)) < NUM_TEMPLATES, "heldout_templates", self.heldout_templates,
                "must leave at least one phrasing for training")  # fmt: skip
        foreign = [lang for lang in TRAINED_LANGUAGES if lang in self.languages and lang != "en"]
        require(self.num_parallel == 0 or bool(foreign), "num_parallel", self.num_parallel,
                "needs a non-English trained language in `languages`")  # fmt: skip
        if foreign:
            # Parallel pairs are split evenly over the foreign languages; a language's pairs
            # come from captions in other languages (one pair per caption and language).
            captions = split_quota(self.num_captions, self.languages)
            for lang, wanted in split_quota(self.num_parallel, {lang: 1.0 for lang in foreign}).items():
                available = self.num_captions - captions.get(lang, 0)
                require(wanted <= available, "num_parallel", self.num_parallel,
                        f"asks {wanted} {lang} parallel pairs but only {available} captions are not {lang}")  # fmt: skip
        for i, lang in enumerate(self.eval_languages):
            require(lang in LANGUAGES, f"eval_languages[{i}]", lang, f"expected one of {list(LANGUAGES)}")
        require(len(set(self.eval_languages)) == len(self.eval_languages), "eval_languages", self.eval_languages,
                "has duplicates")  # fmt: skip
        return self

    @property
    def num_images(self) -> int:
        return self.num_captions * self.images_per_caption

    def world_dir(self) -> Path:
        """Where this world is (or will be) written."""
        return Path(self.out_dir) if self.out_dir is not None else env.home() / "world" / self.name
