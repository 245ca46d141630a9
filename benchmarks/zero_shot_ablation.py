"""What brings the zero-shot languages (ko, ru) close to English? Issue 18 item 3's ablation.

Each variant is a stage-1 training (the adapter alone, PAPER.md "The three stages" 1) that differs in one
thing: which LLM layer(s) feed the adapter, or which languages stage 1 reads. Every variant runs the
same protocol (same snapshot, base model, steps, seeds) and its stage-1 export is judged with the
world's evaluator on the same prompts and image seeds, so the table's differences are paired.

    export OMNIDIFF_MODELS=/work/main/.omnidiff/models   # the converted Gemma 3 270M
    B=".venv/bin/python benchmarks/zero_shot_ablation.py --work /tmp/abl --snapshot SNAPSHOT_DIR \\
        --base-model BASE_DIR --world-dir WORLD_DIR --evaluator-dir EVALUATOR_DIR --steps 400"
    $B embed --variant mid9          # the variant's LLM cache (+ the CLIP targets once)
    $B train --variant mid9          # stage 1, exported under WORK/runs/mid9/export
    $B evaluate --variant mid9       # its per-prompt verdicts under WORK/eval/mid9/
    $B table                         # every evaluated variant: scores, intervals, ratios to English
    $B align                         # text side only (no images): stage 1's cosine to CLIP, per language
    $B all                           # every step of every --variant in turn (an idle machine)

Each step skips what is already done (a cache is filled only where keys are missing, a finished
training with the same protocol is not rerun, an evaluated variant is not re-evaluated), so on a
shared box each step is one short command under the heavy-work lock. ``--reuse-cache ROOT`` copies
the caches of ROOT whose fingerprints a variant needs into WORK/cache (never writes to ROOT).

Variants (``--variant NAME`` or ``--variant NAME:key=value;key=value`` with train-config overrides,
``llm.layer`` also setting the embed run's layers; a key a variant does not name keeps its value in
configs/train_stage1.yaml and configs/embed.yaml, so ``NAME:align.langs=[en]`` reads today's layer 9):
  last      llm.layer=-1, stage 1 on every language + parallel texts (the default until session 12)
  mid9      llm.layer=9 (Gemma 3 270M has 18 layers: the middle one; today's default)
  concat    llm.layer=[6,12,18], the three layers' states concatenated along the features
  english   llm.layer=-1, align.langs=[en]: stage 1 on English captions alone (MuLan-style)

The table: per (variant, language) the score (mean faithfulness over the eval config's
``score_attributes``) on short prompts with its bootstrap 95% interval (prompts resampled, a prompt's
``--seeds-per-prompt`` images kept together, 2000 resamples, seed 0: omnidiff.scoring.bootstrap_scores),
the ratio of each zero-shot language to English with its interval, and the paired difference to the
first variant. Long prompts get the same table below it.

``align`` (no images, no sampler noise; a few seconds a variant): for every eval prompt, the cosine of the
trained adapter's tokens to the base model's CLIP tokens of the prompt's English side, each CLIP token
matched to one of the first n queries as stage 1's loss matches them (train.losses.set_assignment), and of
the pooled embeddings: stage 1's own objective measured on languages it never trained (ko, ru), with the
paired difference to the first variant (bootstrap over prompts).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict[str, object]] = {
    "last": {"llm.layer": -1},
    "mid9": {"llm.layer": 9},
    "concat": {"llm.layer": [6, 12, 18]},
    "english": {"llm.layer": -1, "align.langs": ["en"]},
}
STEPS = ("embed", "train", "evaluate", "table", "align", "all")


def parse_variant(spec: str) -> tuple[str, dict[str, object]]:
    """``NAME`` (a predefined variant) or ``NAME:key=value;key=value`` (values read as YAML)."""
    import yaml

    name, _, rest = spec.partition(":")
    if not rest:
        if name not in VARIANTS:
            raise SystemExit(f"--variant {spec!r}: not one of {sorted(VARIANTS)}; or give NAME:key=value;...")
        return name, dict(VARIANTS[name])
    overrides: dict[str, object] = {}  # what it does not name stays configs/train_stage1.yaml's (llm.layer: 9)
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {spec!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def _dotted(items: dict[str, object]) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in items.items()]


class Ablation:
    """One protocol (paths, steps, evaluation size) and the work folder its variants live in."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.work = Path(args.work).resolve()
        self.cache = self.work / "cache"

    # -- configs --------------------------------------------------------------------------------
    def embed_config(self, overrides: dict[str, object]):
        from embed_cache.config import EmbedConfig
        from omnidiff.config import load_config

        items = {"snapshots": [str(self.args.snapshot)], "kinds": ["llm", "clip"], "cache_root": str(self.cache),
                 "clip.base_model": str(self.args.base_model), "executor": "local", "track": False}
        if "llm.layer" in overrides:  # else configs/embed.yaml's layer, the same as configs/train_stage1.yaml's
            items["llm.layer"] = overrides["llm.layer"]
        return load_config(EmbedConfig, REPO / "configs" / "embed.yaml", _dotted(items) + self.args.embed_set)

    def train_config(self, name: str, overrides: dict[str, object]):
        from omnidiff.config import load_config
        from train.config import TrainConfig

        run = self.work / "runs" / name
        items = {"name": f"ablation-{name}", "base_model": str(self.args.base_model), "data.snapshot": str(self.args.snapshot),
                 "data.cache_root": str(self.cache), "checkpoint.dir": str(run / "checkpoints"),
                 "registry.export_dir": str(run / "export"), "registry.register": False, "track": False,
                 "max_steps": self.args.steps, "checkpoint.every_steps": max(1, self.args.steps // 4),
                 "samples.per_group": 0, "seed": self.args.seed, "dist.launcher": self.args.launcher,
                 "dist.num_workers": 1 if self.args.launcher == "local" else 2, **overrides}
        return load_config(TrainConfig, REPO / "configs" / "train_stage1.yaml", _dotted(items) + self.args.train_set)

    def eval_config(self, name: str):
        from omnidiff.config import load_config
        from train.eval_config import EvalConfig

        items = {"world_dir": str(self.args.world_dir), "evaluator_dir": str(self.args.evaluator_dir), "baseline": "none",
                 "langs": self.args.langs, "max_per_group": self.args.max_per_group, "seed": self.args.seed,
                 "track": False, "report_dir": str(self.work / "eval" / name / "report"),
                 # the protocol's prompts and sampler, pinned against configs/evaluate.yaml's later defaults: the
                 # world's own 32 specs, 20 sampler steps; --seeds-per-prompt images per prompt, each its own seed
                 # (train.evaluate.with_image_seeds: a spec's k-th image gets the same noise in every language and
                 # every variant, so the differences are paired by image too)
                 "eval_specs": 0, "images_per_prompt": self.args.seeds_per_prompt, "steps": 20}
        return load_config(EvalConfig, REPO / "configs" / "evaluate.yaml", _dotted(items) + self.args.eval_set)

    # -- steps ----------------------------------------------------------------------------------
    def reuse_caches(self, cfg) -> None:
        """Copy the caches this variant needs from ``--reuse-cache`` (same fingerprint = same states)."""
        from embed_cache.plan import plan_kind

        if not self.args.reuse_cache:
            return
        for kind in cfg.kinds:
            fp = plan_kind(kind, cfg).fingerprint
            source, target = Path(self.args.reuse_cache) / kind / fp, self.cache / kind / fp
            if source.is_dir() and not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(source, target.with_name(target.name + ".copying"))
                target.with_name(target.name + ".copying").rename(target)
                print(f"[ablation] reused {kind} cache {fp} from {source.parent.parent}", flush=True)

    def embed(self, name: str, overrides: dict[str, object]) -> None:
        from embed_cache.job import run

        cfg = self.embed_config(overrides)
        self.reuse_caches(cfg)
        t0 = time.perf_counter()
        run(cfg)
        print(f"[ablation] {name}: embed done in {time.perf_counter() - t0:.0f} s", flush=True)

    def protocol(self, name: str, overrides: dict[str, object]) -> dict:
        return {"variant": name, "overrides": overrides, "steps": self.args.steps, "seed": self.args.seed,
                "snapshot": str(self.args.snapshot), "base_model": str(self.args.base_model),
                "train_set": self.args.train_set, "launcher": self.args.launcher}

    def train(self, name: str, overrides: dict[str, object]) -> None:
        from train.launch import run

        done = self.work / "runs" / name / "done.json"
        protocol = self.protocol(name, overrides)
        if done.is_file() and json.loads(done.read_text())["protocol"] == protocol:
            print(f"[ablation] {name}: trained already ({done})", flush=True)
            return
        run_dir = self.work / "runs" / name
        if run_dir.exists():  # another protocol's training (or an interrupted one of this protocol: it resumes)
            stamp = run_dir / "protocol.json"
            if not stamp.is_file() or json.loads(stamp.read_text()) != protocol:
                aside = run_dir.with_name(f"{name}.{time.strftime('%Y%m%d-%H%M%S')}")
                run_dir.rename(aside)
                print(f"[ablation] {name}: a training of another protocol moved to {aside}", flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "protocol.json").write_text(json.dumps(protocol, indent=2))
        cfg = self.train_config(name, overrides)
        t0 = time.perf_counter()
        result = run(cfg)
        wall = time.perf_counter() - t0
        done.write_text(json.dumps({"protocol": protocol, "export_dir": result["export_dir"], "wall_s": wall,
                                    "final_loss": result.get("loss"), "val_loss": result.get("val_loss")}, indent=2))
        print(f"[ablation] {name}: stage 1 done in {wall:.0f} s, loss {result.get('loss')}", flush=True)

    def evaluate(self, name: str) -> None:
        import pandas as pd

        from train.evaluate import evaluate, resolve_inputs

        done = self.work / "runs" / name / "done.json"
        if not done.is_file():
            raise SystemExit(f"[ablation] {name}: not trained yet ({done} missing): run the train step first")
        out = self.work / "eval" / name / "per_prompt.parquet"
        setting = {"langs": self.args.langs, "max_per_group": self.args.max_per_group,
                   "seeds_per_prompt": self.args.seeds_per_prompt, "seed": self.args.seed, "eval_set": self.args.eval_set,
                   "trained": json.loads(done.read_text())["protocol"],
                   # images seeded by the evaluation itself; before, the script repeated each prompt row after the
                   # evaluation had given it its seed, so a prompt's "images" were one image drawn k times
                   "seeding": "with_image_seeds"}
        stamp = out.with_suffix(".json")
        if out.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == setting:
            print(f"[ablation] {name}: evaluated already ({out})", flush=True)
            return
        cfg = self.eval_config(name)
        inputs = resolve_inputs(cfg)  # --seeds-per-prompt rows per prompt, each its own image seed; one bootstrap unit
        t0 = time.perf_counter()
        report = evaluate({name: json.loads(done.read_text())["export_dir"]}, cfg, inputs=inputs)
        out.parent.mkdir(parents=True, exist_ok=True)
        pd.DataFrame(report.per_prompt).to_parquet(out)
        stamp.write_text(json.dumps(setting, indent=2))
        print(f"[ablation] {name}: evaluated {len(inputs.prompts)} images in {time.perf_counter() - t0:.0f} s", flush=True)

    # -- the table ------------------------------------------------------------------------------
    def table(self, names: list[str]) -> str:
        import pandas as pd

        cfg = self.eval_config(names[0] if names else "table")
        frames = []
        evaluated = sorted((self.work / "eval").glob("*/per_prompt.parquet"))
        order = names or [p.parent.name for p in evaluated]
        for name in order:
            path = self.work / "eval" / name / "per_prompt.parquet"
            if path.is_file():
                frames.append(pd.read_parquet(path).assign(model=name))
        if not frames:
            raise SystemExit(f"[ablation] nothing evaluated under {self.work / 'eval'}")
        text = ablation_table(pd.concat(frames, ignore_index=True), [f["model"].iloc[0] for f in frames],
                              tuple(cfg.score_attributes), cfg.bootstrap_resamples, cfg.bootstrap_seed, cfg.confidence)
        for name in [f["model"].iloc[0] for f in frames]:
            done = json.loads((self.work / "runs" / name / "done.json").read_text())
            text += (f"\n{name}: {json.dumps(done['protocol']['overrides'])}, stage 1 {done['wall_s']:.0f} s, "
                     f"final loss {done['final_loss']:.4f}")
        return text + "\n"


def text_alignment(work: Path, names: list[str], base_model: str, world_dir: str, langs: list[str], seed: int = 0,
                   resamples: int = 2000) -> str:
    """``align``'s table: per (variant, language) the mean token / pooled cosine of the variant's adapter output
    for each eval prompt to the base model's CLIP encoding of its English side, short prompts (<=77 CLIP tokens:
    one window) and long ones (three stitched windows, the stage-1 target), and the difference to the first
    variant with a bootstrap 95% interval (prompts resampled, the same resamples for every variant)."""
    import numpy as np
    import pandas as pd
    import torch
    import torch.nn.functional as F

    from omnidiff.pipeline import OmniDiffusionPipeline
    from train.evaluate import eval_prompts, select_prompts
    from train.losses import set_assignment

    prompts = select_prompts(eval_prompts(Path(world_dir), 0), 0, tuple(langs), seed).reset_index(drop=True)
    base = OmniDiffusionPipeline.from_pretrained(base_model)
    base.clip_max_windows = 3  # the stage-1 target: three stitched windows (configs/train_stage1.yaml align.clip_windows)
    rows: list[dict] = []
    with torch.no_grad():
        target, target_pooled, target_mask = base.encode_prompt(prompts["prompt_en"].tolist())  # (N, 231, D), (N, D), (N, 231)
        for name in names:
            export = json.loads((work / "runs" / name / "done.json").read_text())["export_dir"]
            pipe = OmniDiffusionPipeline.from_pretrained(export)
            tokens, pooled, _ = pipe.encode_prompt(prompts["prompt"].tolist())  # (N, Q, D), (N, D)
            order = set_assignment(tokens, target, target_mask)  # (N, 231): the query answering each CLIP position
            matched = tokens.gather(1, order[..., None].expand(-1, -1, tokens.shape[-1]))  # (N, 231, D)
            cos = F.cosine_similarity(matched, target, dim=-1)  # (N, 231)
            token_cos = (cos * target_mask).sum(1) / target_mask.sum(1)  # (N,)
            pooled_cos = F.cosine_similarity(pooled, target_pooled, dim=-1)  # (N,)
            rows += [{"model": name, "prompt": i, "lang": lang, "long": bool(long), "token": float(t), "pooled": float(p)}
                     for i, (lang, long, t, p) in enumerate(zip(prompts["lang"], prompts["is_long"], token_cos,
                                                                 pooled_cos, strict=True))]
    frame = pd.DataFrame(rows)
    rng = np.random.default_rng(seed)
    out = []
    for long in (False, True):
        part = frame[frame["long"] == long]
        n_prompts = part[part["model"] == names[0]].groupby("lang").size()
        out += [f"\n{'long' if long else 'short'} prompts ({n_prompts.min()} per language): token cos / pooled cos "
                f"to CLIP of the English side; difference to {names[0]} [95%]\n",
                "| variant | " + " | ".join(f"{lang} token / pooled" for lang in langs) + " | "
                + " | ".join(f"{lang} token - {names[0]}" for lang in langs) + " |", "|---" * (1 + 2 * len(langs)) + "|"]
        draws = {lang: rng.integers(0, n_prompts[lang], (resamples, n_prompts[lang])) for lang in langs}
        first = {lang: part[(part["model"] == names[0]) & (part["lang"] == lang)]["token"].to_numpy() for lang in langs}
        for name in names:
            cells, diffs = [name], []
            for lang in langs:
                sel = part[(part["model"] == name) & (part["lang"] == lang)]
                cells.append(f"{sel['token'].mean():.3f} / {sel['pooled'].mean():.3f}")
                if name == names[0]:
                    diffs.append("-")
                    continue
                delta = sel["token"].to_numpy() - first[lang]  # the same prompts in the same order: paired
                low, high = np.quantile(delta[draws[lang]].mean(1), [0.025, 0.975])
                diffs.append(f"{delta.mean():+.3f} [{low:+.3f}, {high:+.3f}]")
            out.append("| " + " | ".join(cells + diffs) + " |")
    return "\n".join(out) + "\n"


def ablation_table(per_prompt, models: list[str], attributes: tuple[str, ...], resamples: int = 2000, seed: int = 0,
                   confidence: float = 0.95, reference_lang: str = "en") -> str:
    """Markdown tables (short, then long prompts): score [95% interval] per (model, language), each other
    language's ratio to ``reference_lang``, and the paired difference to the first model."""
    import numpy as np

    from omnidiff.scoring import bootstrap_scores

    point, reps = bootstrap_scores(per_prompt, attributes, resamples, seed)
    alpha = (1 - confidence) / 2

    def interval(values) -> str:
        low, high = np.nanquantile(values, [alpha, 1 - alpha])
        return f"[{low:.2f}, {high:.2f}]"

    langs = sorted({lang for _, lang, _ in point}, key=lambda x: (x != reference_lang, x))
    lengths = sorted({k[2] for k in point}, key=lambda x: (x not in ("short", "<=77"), x))  # short prompts first
    out = []
    first = models[0]
    for length in lengths:
        others = [lang for lang in langs if lang != reference_lang]
        head = (["variant"] + [f"{lang} score [95%]" for lang in langs]
                + [f"{lang}/{reference_lang} [95%]" for lang in others]
                + [f"{lang} - {first} [95%]" for lang in langs])
        part = per_prompt[per_prompt["length"] == length]
        seeds = part.groupby(["model", "prompt"]).size().max()
        out += [f"\nprompts of {length} tokens ({part['prompt'].nunique()} distinct, {seeds} image(s) each; "
                f"score = mean of {'/'.join(attributes)})\n", "| " + " | ".join(head) + " |",
                "|" + "---|" * len(head)]
        for model in models:
            cells = [model]
            for lang in langs:
                key = (model, lang, length)
                cells.append(f"{point[key]:.2f} {interval(reps[key])}" if key in point else "-")
            ref = (model, reference_lang, length)
            for lang in others:
                key = (model, lang, length)
                if key in point and ref in point and point[ref] > 0:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        ratio = reps[key] / reps[ref]
                    cells.append(f"{point[key] / point[ref]:.2f}x {interval(ratio[np.isfinite(ratio)])}")
                else:
                    cells.append("-")
            for lang in langs:
                key, base = (model, lang, length), (first, lang, length)
                if model == first or key not in point or base not in point:
                    cells.append("-")
                else:  # one set of resamples per (lang, length) shared by every model: a paired difference
                    cells.append(f"{point[key] - point[base]:+.2f} {interval(reps[key] - reps[base])}")
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("step", choices=STEPS)
    parser.add_argument("--variant", action="append", default=[], help="NAME or NAME:key=value;... (repeatable)")
    parser.add_argument("--work", required=True, help="the folder every cache, checkpoint, export and result goes to")
    parser.add_argument("--snapshot", help="the pair snapshot folder (stage 1's data)")
    parser.add_argument("--base-model", help="the base model folder (the CLIP targets, the UNet)")
    parser.add_argument("--world-dir", help="the world whose eval prompts and judge are used")
    parser.add_argument("--evaluator-dir", help="the world's trained evaluator folder")
    parser.add_argument("--reuse-cache", help="a cache root to copy matching caches from (read only)")
    parser.add_argument("--steps", type=int, default=400, help="stage-1 optimizer steps (the demo: 1200)")
    parser.add_argument("--seed", type=int, default=0, help="training seed and evaluation seed, every variant")
    parser.add_argument("--launcher", choices=("local", "ray"), default="ray",
                        help="ray: 2 Ray Train workers of 1 CPU (the demo's stage 1); local: one DeepSpeed rank "
                             "in this process, 1 thread, the global batch by accumulation (2.5x slower here)")
    parser.add_argument("--langs", default="en,de,ko,ru", help="evaluated languages, comma-separated, English first")
    parser.add_argument("--max-per-group", type=int, default=0, help="prompts per (language, length); 0 = all")
    parser.add_argument("--seeds-per-prompt", type=int, default=2, help="images per prompt, each its own seed")
    parser.add_argument("--embed-set", action="append", default=[], help="embed config override key=value")
    parser.add_argument("--train-set", action="append", default=[], help="train config override key=value")
    parser.add_argument("--eval-set", action="append", default=[], help="evaluate config override key=value")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args(argv)
    args.langs = [lang.strip() for lang in args.langs.split(",") if lang.strip()]
    variants = dict(parse_variant(v) for v in (args.variant or list(VARIANTS)))
    if args.step in ("embed", "train", "evaluate", "align", "all"):
        missing = [f"--{k.replace('_', '-')}" for k in ("snapshot", "base_model", "world_dir", "evaluator_dir")
                   if getattr(args, k) is None]
        if missing:
            parser.error(f"{args.step} needs {', '.join(missing)}")
    os.environ.setdefault("OMNIDIFF_HOME", str(Path(args.work).resolve() / "home"))  # nothing lands in the caller's home
    ablation = Ablation(args)
    ablation.work.mkdir(parents=True, exist_ok=True)
    for name, overrides in variants.items():
        if args.step in ("embed", "all"):
            ablation.embed(name, overrides)
        if args.step in ("train", "all"):
            ablation.train(name, overrides)
        if args.step in ("evaluate", "all"):
            ablation.evaluate(name)
    if args.step == "align":
        names = list(variants) if args.variant else sorted(p.parent.name for p in (ablation.work / "runs").glob("*/done.json"))
        text = text_alignment(ablation.work, names, args.base_model, args.world_dir, args.langs, args.seed)
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    if args.step in ("table", "all"):
        text = ablation.table(list(variants) if args.variant else [])
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
