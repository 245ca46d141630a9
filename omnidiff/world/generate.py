"""Generate the tiny world: images, training pairs, parallel texts, eval prompts.

    omnidiff world generate --config configs/world.yaml          # -> $OMNIDIFF_HOME/world/default
    python -c "from omnidiff.world import *; generate_world(WorldConfig(num_captions=20))"

Layout of the world folder (architecture.md, "Url list"):

    images/<image_id>.png   image_size x image_size RGB
    pairs.parquet           image_id, image (relative path), caption, lang, caption_en, shape, colour,
                            position, size, background, quality, is_long, template_id, caption_id
    parallel.parquet        lang, text, text_en, is_long, template_id (text-only pairs for stage 1)
    eval_prompts.parquet    prompt, lang, prompt_en, shape, colour, position, size, background,
                            is_long, template_id, heldout_reason, zero_shot, spec_id
    world.json              config, counts, per-file sha256 and the digest of all of the above

No urls here: :func:`write_url_list` writes the LAION-style list once the
server's base url is known. Everything follows from ``cfg.seed`` through
separate random streams (captions, images, parallel, eval), so the same config
gives byte-identical files and a bigger eval set does not change the training data.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from omnidiff.config import to_dict
from omnidiff.contracts.io import sha256_file
from omnidiff.progress import Progress
from omnidiff.world.attributes import ATTRIBUTES
from omnidiff.world.captions import (
    NUM_PARAPHRASES,
    NUM_TEMPLATES,
    TRAINED_LANGUAGES,
    CaptionSpec,
    caption,
    choose_filler,
    lexicon,
    paraphrase,
    template_id,
)
from omnidiff.world.config import WorldConfig, split_quota
from omnidiff.world.render import render

# Bump when a change to the templates, fillers, renderer or layout changes the output.
GENERATOR_VERSION = "1"
LEXICON_TEMPLATE = "lexicon"  # the phrasing id of a parallel word pair: "<lang>/lexicon"
PARAPHRASE_TEMPLATE = "p"  # the phrasing id of a paraphrase pair: "<lang>/p<k>"

PAIR_COLUMNS = ("image_id", "image", "caption", "lang", "caption_en", "shape", "colour", "position", "size",
                "background", "quality", "is_long", "template_id", "caption_id")  # fmt: skip
# Ground truth that travels with every url-list row.
GROUND_TRUTH = ("shape", "colour", "position", "size", "background", "quality", "is_long", "template_id", "image_id")
URL_LIST_FORMATS = {"parquet": "parquet", "csv": "csv", "tsv": "tsv", "jsonl": "jsonl"}

_STRING, _BOOL, _INT = pa.string(), pa.bool_(), pa.int32()
_TYPES = {"is_long": _BOOL, "zero_shot": _BOOL, "caption_id": _INT, "spec_id": _INT}
# The same reasons cycle through the short and the long eval prompts: half seen, a quarter each held out.
_EVAL_REASONS = ("none", "combo", "none", "phrasing")


def _rng(cfg: WorldConfig, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([cfg.seed, stream]))


def _round(x: float) -> int:
    return int(np.floor(x + 0.5))


def _heldout_combos(cfg: WorldConfig) -> set[tuple[str, str]]:
    return {tuple(c.split("/", 1)) for c in cfg.heldout_combos}  # type: ignore[misc]


def _allowed_combos(cfg: WorldConfig) -> list[tuple[str, str]]:
    held = _heldout_combos(cfg)
    return [(s, c) for s in ATTRIBUTES["shape"] for c in ATTRIBUTES["colour"] if (s, c) not in held]


def _train_templates(cfg: WorldConfig) -> list[int]:
    return [t for t in range(NUM_TEMPLATES) if t not in cfg.heldout_templates]


def _pick(rng: np.random.Generator, values) -> object:
    return values[int(rng.integers(len(values)))]


def _spec(rng: np.random.Generator, combo: tuple[str, str], template: int, long: bool, min_tokens: int) -> CaptionSpec:
    return CaptionSpec(
        shape=combo[0], colour=combo[1],
        position=str(_pick(rng, ATTRIBUTES["position"])), size=str(_pick(rng, ATTRIBUTES["size"])),
        background=str(_pick(rng, ATTRIBUTES["background"])), template=template,
        filler=choose_filler(rng, min_tokens) if long else (),
    )  # fmt: skip


def plan_captions(cfg: WorldConfig) -> list[tuple[CaptionSpec, str]]:
    """The training captions as (spec, language): exact language and per-language long quotas."""
    rng = _rng(cfg, 0)
    shares = {lang: cfg.languages[lang] for lang in TRAINED_LANGUAGES if lang in cfg.languages}
    langs = [lang for lang, n in split_quota(cfg.num_captions, shares).items() for _ in range(n)]
    langs = [langs[i] for i in rng.permutation(len(langs))]
    is_long = [False] * len(langs)
    for lang in shares:
        where = [i for i, x in enumerate(langs) if x == lang]
        for i in rng.permutation(where)[: _round(len(where) * cfg.long_fraction)]:
            is_long[int(i)] = True
    combos, templates = _allowed_combos(cfg), _train_templates(cfg)
    plan = []
    for lang, long in zip(langs, is_long, strict=True):
        combo = combos[int(rng.integers(len(combos)))]
        template = int(_pick(rng, templates))
        plan.append((_spec(rng, combo, template, long, cfg.long_min_prefix_tokens), lang))
    return plan


def plan_images(cfg: WorldConfig) -> list[dict]:
    """Per image: the caption it belongs to, its quality, jitter and noise seed."""
    rng = _rng(cfg, 1)
    n = cfg.num_images
    degraded = set(rng.permutation(n)[: _round(n * cfg.degraded_fraction)].tolist())
    jitter = rng.uniform(-cfg.jitter, cfg.jitter, size=(n, 2))  # (N, 2) as fractions of the side
    seeds = rng.integers(0, 2**31 - 1, size=n)
    return [
        {"image_id": f"{j:06d}", "caption_id": j // cfg.images_per_caption,
         "quality": "degraded" if j in degraded else "clean",
         "jitter": (float(jitter[j, 0]), float(jitter[j, 1])), "seed": int(seeds[j])}
        for j in range(n)
    ]  # fmt: skip


def plan_parallel(cfg: WorldConfig, captions: list[tuple[CaptionSpec, str]]) -> list[dict]:
    """Text-only pairs: a training caption's spec rendered in another trained language, with its English; then
    (``parallel_lexicon``) each language's attribute words with their English (template id ``<lang>/lexicon``)."""
    rng = _rng(cfg, 2)
    foreign = [lang for lang in TRAINED_LANGUAGES if lang in cfg.languages and lang != "en"]
    if not foreign:
        return []
    rows = []
    if cfg.num_parallel:
        for lang, wanted in split_quota(cfg.num_parallel, {lang: 1.0 for lang in foreign}).items():
            candidates = [i for i, (_, own) in enumerate(captions) if own != lang]
            for k in sorted(rng.choice(len(candidates), size=wanted, replace=False).tolist()):
                spec = captions[candidates[k]][0]
                rows.append({"lang": lang, "text": caption(spec, lang), "text_en": caption(spec, "en"),
                             "is_long": spec.is_long, "template_id": template_id(lang, spec.template)})  # fmt: skip
    if cfg.num_paraphrases:
        rows += _plan_paraphrases(cfg)
    if cfg.parallel_lexicon:
        for lang in foreign:
            rows += [{"lang": lang, "text": word, "text_en": english, "is_long": False,
                      "template_id": f"{lang}/{LEXICON_TEMPLATE}"} for word, english in lexicon(lang)]  # fmt: skip
    return rows


def _plan_paraphrases(cfg: WorldConfig) -> list[dict]:
    """``num_paraphrases`` text pairs over every trained language, English included (its text is its English
    side): a spec of the training combos rendered with a paraphrase (``captions.paraphrase``: phrasings no caption
    or eval prompt uses), long as often as captions are. Their own random stream: the other rows do not move."""
    rng = _rng(cfg, 4)
    langs = [lang for lang in TRAINED_LANGUAGES if lang in cfg.languages]
    combos, rows = _allowed_combos(cfg), []
    for lang, wanted in split_quota(cfg.num_paraphrases, {lang: 1.0 for lang in langs}).items():
        for _ in range(wanted):
            combo, k = combos[int(rng.integers(len(combos)))], int(rng.integers(NUM_PARAPHRASES))
            spec = _spec(rng, combo, 0, bool(rng.random() < cfg.long_fraction), cfg.long_min_prefix_tokens)
            rows.append({"lang": lang, "text": paraphrase(spec, lang, k), "text_en": paraphrase(spec, "en", k),
                         "is_long": spec.is_long, "template_id": f"{lang}/{PARAPHRASE_TEMPLATE}{k}"})  # fmt: skip
    return rows


def plan_eval(cfg: WorldConfig) -> list[dict]:
    """A fixed set of specs, each rendered in every eval language (so languages compare like for like)."""
    rng = _rng(cfg, 3)
    n_long = _round(cfg.eval_specs * cfg.eval_long_fraction)
    combos, held = _allowed_combos(cfg), [tuple(c.split("/", 1)) for c in cfg.heldout_combos]
    train_t, held_t = _train_templates(cfg), sorted(set(cfg.heldout_templates))
    n_combo = 0
    specs: list[tuple[CaptionSpec, str]] = []
    for k in range(cfg.eval_specs):
        long = k >= cfg.eval_specs - n_long
        position_in_group = k - (cfg.eval_specs - n_long) if long else k
        reason = _EVAL_REASONS[position_in_group % len(_EVAL_REASONS)]
        if (reason == "combo" and not held) or (reason == "phrasing" and not held_t):
            reason = "none"
        if reason == "combo":
            combo, n_combo = held[n_combo % len(held)], n_combo + 1
        else:
            combo = combos[int(rng.integers(len(combos)))]
        template = int(_pick(rng, held_t if reason == "phrasing" else train_t))
        specs.append((_spec(rng, combo, template, long, cfg.long_min_prefix_tokens), reason))
    rows = []
    for spec_id, (spec, reason) in enumerate(specs):
        prompt_en = caption(spec, "en")
        for lang in cfg.eval_languages:
            rows.append({
                "prompt": caption(spec, lang), "lang": lang, "prompt_en": prompt_en, **spec.attrs(),
                "is_long": spec.is_long, "template_id": template_id(lang, spec.template),
                "heldout_reason": reason, "zero_shot": lang not in cfg.languages, "spec_id": spec_id,
            })  # fmt: skip
    return rows


def _table(rows: list[dict], columns: tuple[str, ...]) -> pa.Table:
    schema = pa.schema([(c, _TYPES.get(c, _STRING)) for c in columns])
    return pa.Table.from_pydict({c: [r[c] for r in rows] for c in columns}, schema=schema)


def _write_parquet(table: pa.Table, path: Path) -> None:
    pq.write_table(table, path, compression="zstd")


def world_record(cfg: WorldConfig) -> dict:
    """What identifies a world's content: the generator version and the config without ``out_dir``."""
    config = to_dict(cfg)
    config.pop("out_dir", None)
    return json.loads(json.dumps({"generator_version": GENERATOR_VERSION, "config": config}))


def generate_world(cfg: WorldConfig, force: bool = False) -> Path:
    """Write the world to ``cfg.world_dir()`` and return that folder.

    A folder that already holds this exact world (same generator version and
    config) is returned as is unless ``force``. The world is written to a
    temporary sibling and renamed into place, so a reader never sees half a world.
    """
    out = cfg.world_dir().resolve()
    record = world_record(cfg)
    meta = out / "world.json"
    if meta.is_file() and not force:
        existing = json.loads(meta.read_text(encoding="utf-8"))
        if {k: existing.get(k) for k in record} == record:
            return out
    if out.exists() and not (meta.is_file() or (out.is_dir() and not any(out.iterdir()))):
        raise FileExistsError(f"out_dir={str(out)!r} exists and is not a tiny world (no world.json); not replacing it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        counts = _write_world(cfg, tmp)
        files = {name: sha256_file(tmp / name) for name in ("pairs.parquet", "parallel.parquet", "eval_prompts.parquet")}
        digest = world_digest(tmp)
        meta_obj = {**record, "counts": counts, "files": files, "digest": digest, "pairs_digest": pairs_digest(tmp)}
        (tmp / "world.json").write_text(json.dumps(meta_obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_world(cfg: WorldConfig, root: Path) -> dict:
    captions = plan_captions(cfg)
    texts = [(caption(spec, lang), caption(spec, "en")) for spec, lang in captions]
    pairs = []
    with Progress("world", total=cfg.num_images, unit="img") as progress:
        for image in plan_images(cfg):
            spec, lang = captions[image["caption_id"]]
            attrs = {**spec.attrs(), "quality": image["quality"]}
            picture = render(attrs, cfg.image_size, jitter=image["jitter"], seed=image["seed"],
                             supersample=cfg.supersample)  # fmt: skip
            rel = f"images/{image['image_id']}.png"
            picture.save(root / rel, format="PNG")
            text, text_en = texts[image["caption_id"]]
            pairs.append({
                "image_id": image["image_id"], "image": rel, "caption": text, "lang": lang, "caption_en": text_en,
                **attrs, "is_long": spec.is_long, "template_id": template_id(lang, spec.template),
                "caption_id": image["caption_id"],
            })  # fmt: skip
            progress.update()
    parallel = plan_parallel(cfg, captions)
    evals = plan_eval(cfg)
    _write_parquet(_table(pairs, PAIR_COLUMNS), root / "pairs.parquet")
    _write_parquet(_table(parallel, ("lang", "text", "text_en", "is_long", "template_id")), root / "parallel.parquet")
    eval_columns = ("prompt", "lang", "prompt_en", "shape", "colour", "position", "size", "background", "is_long",
                    "template_id", "heldout_reason", "zero_shot", "spec_id")  # fmt: skip
    _write_parquet(_table(evals, eval_columns), root / "eval_prompts.parquet")

    def by(rows: list[dict], key: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for row in rows:
            out[str(row[key])] = out.get(str(row[key]), 0) + 1
        return dict(sorted(out.items()))

    train_texts = {t for pair in texts for t in pair} | {r["text"] for r in parallel} | {r["text_en"] for r in parallel}
    eval_texts = {r["prompt"] for r in evals} | {r["prompt_en"] for r in evals}
    return {
        "images": len(pairs), "captions": len(captions), "pairs_by_lang": by(pairs, "lang"),
        "long_pairs": sum(p["is_long"] for p in pairs), "degraded_images": sum(p["quality"] == "degraded" for p in pairs),
        "parallel": len(parallel), "parallel_by_lang": by(parallel, "lang"),
        "eval_prompts": len(evals), "eval_by_reason": by(evals, "heldout_reason"),
        "distinct_training_texts": len(train_texts), "distinct_texts": len(train_texts | eval_texts),
    }  # fmt: skip


def _files_digest(root: Path, names: tuple[str, ...]) -> str:
    """sha256 over (relative path, sha256) of every image and the named Parquet files, in this order."""
    h = hashlib.sha256()
    for path in sorted(root.glob("images/*.png")) + [root / n for n in names]:
        h.update(f"{path.relative_to(root).as_posix()}\t{sha256_file(path)}\n".encode())
    return h.hexdigest()


def world_digest(world_dir: str | Path) -> str:
    """sha256 over (relative path, sha256) of every image and the three Parquet files, in sorted order."""
    return _files_digest(Path(world_dir), ("pairs.parquet", "parallel.parquet", "eval_prompts.parquet"))


def pairs_digest(world_dir: str | Path) -> str:
    """The digest of what a base model pretrains on: every image and ``pairs.parquet`` (the world's parallel texts
    and eval prompts change no base weight, so a change to them keeps the base, and its shipped copy)."""
    return _files_digest(Path(world_dir), ("pairs.parquet",))


def world_pairs_digest(world_dir: str | Path) -> str:
    """:func:`pairs_digest` as world.json records it (worlds generated before it was recorded: computed)."""
    return load_world_meta(world_dir).get("pairs_digest") or pairs_digest(world_dir)


def load_world_meta(world_dir: str | Path) -> dict:
    """world.json of a generated world; a clear error if the folder is not one."""
    meta = Path(world_dir) / "world.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{str(world_dir)!r} is not a tiny world (no world.json); run `omnidiff world generate`")
    return json.loads(meta.read_text(encoding="utf-8"))


def write_url_list(world_dir: str | Path, base_url: str, fmt: str = "parquet", out_path: str | Path | None = None) -> Path:
    """A LAION-style url list of the world's pairs: url, caption, lang, caption_en + ground truth.

    base_url: where :func:`serve_world` (or ``omnidiff world serve``) serves the world,
    e.g. ``http://127.0.0.1:8765``; each url is ``<base_url>/images/<image_id>.png``.
    fmt: parquet, csv, tsv or jsonl. Default path: ``<world_dir>/urls.<fmt>``.
    """
    root = Path(world_dir)
    load_world_meta(root)
    if fmt not in URL_LIST_FORMATS:
        raise ValueError(f"fmt={fmt!r}: unknown url list format; expected one of {list(URL_LIST_FORMATS)}")
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"base_url={base_url!r}: must start with http:// or https://")
    pairs = pq.read_table(root / "pairs.parquet")
    base = base_url.rstrip("/")
    urls = pa.array([f"{base}/{rel}" for rel in pairs.column("image").to_pylist()], pa.string())
    columns = ("caption", "lang", "caption_en") + GROUND_TRUTH
    table = pa.table([urls] + [pairs.column(c) for c in columns], names=("url",) + columns)
    path = Path(out_path) if out_path is not None else root / f"urls.{URL_LIST_FORMATS[fmt]}"
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "parquet":
        _write_parquet(table, path)
    elif fmt in ("csv", "tsv"):
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="," if fmt == "csv" else "\t"))
    else:
        with path.open("w", encoding="utf-8") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path
