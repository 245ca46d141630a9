"""The tiny world: a seeded generator of small shape images with multilingual captions.

    omnidiff world generate --config configs/world.yaml
    omnidiff world serve --port 8765

See generate.py for the folder layout and captions.py for languages and templates.
"""

from omnidiff.world.attributes import ATTRIBUTES, PROMPT_ATTRIBUTES
from omnidiff.world.captions import (
    LANGUAGES,
    TRAINED_LANGUAGES,
    ZERO_SHOT_LANGUAGES,
    CaptionSpec,
    caption,
    clip_token_count,
    clip_tokens,
    english_vocabulary,
)
from omnidiff.world.config import WorldConfig
from omnidiff.world.generate import (
    generate_world,
    load_world_meta,
    pairs_digest,
    world_digest,
    world_pairs_digest,
    write_url_list,
)
from omnidiff.world.render import render
from omnidiff.world.server import serve_world

__all__ = [
    "ATTRIBUTES",
    "LANGUAGES",
    "PROMPT_ATTRIBUTES",
    "TRAINED_LANGUAGES",
    "ZERO_SHOT_LANGUAGES",
    "CaptionSpec",
    "WorldConfig",
    "caption",
    "clip_token_count",
    "clip_tokens",
    "english_vocabulary",
    "generate_world",
    "load_world_meta",
    "render",
    "serve_world",
    "world_digest",
    "pairs_digest",
    "world_pairs_digest",
    "write_url_list",
]
