"""``omnidiff base``: pretrain the base text-to-image model, train its evaluator, score a model.

    omnidiff base pretrain  --config configs/base.yaml [key=value ...]   # cached pipeline folder
    omnidiff base evaluator --config configs/base.yaml [key=value ...]   # cached evaluator folder
    omnidiff base score     --config configs/base.yaml [score.model=PATH|name@alias] [key=value ...]

``score`` generates ``score.images_per_prompt`` images per eval prompt of the
world (every language, short and long), judges them with the evaluator, and
writes ``per_prompt.parquet``, ``summary.csv``, ``score.json`` (headline numbers
+ the command) and one image grid per language into ``score.out_dir``; with
``track=true`` the same goes to MLflow with a bar chart per language and length.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path

from omnidiff.base.config import BaseConfig
from omnidiff.config import ConfigError, load_config

DEFAULT_CONFIG = "configs/base.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnidiff base", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("pretrain", "pretrain (or reuse) the base text-to-image model"),
        ("evaluator", "train (or reuse) the attribute evaluator and report its accuracy"),
        ("score", "prompt faithfulness of a model per attribute, language and length"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=DEFAULT_CONFIG, help=f"a kind: base YAML (default {DEFAULT_CONFIG})")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. pretrain.steps=100")
    return parser


def score(cfg: BaseConfig, command: str = "") -> dict:
    """Score ``cfg.score.model`` (default: this config's base model) on the world's eval prompts."""
    import pandas as pd

    from omnidiff import scoring
    from omnidiff.base.evaluator_train import ensure_evaluator
    from omnidiff.base.pretrain import pretrain, resolve_world
    from omnidiff.env import subdir
    from omnidiff.pipeline import OmniDiffusionPipeline

    sc, sm = cfg.score, cfg.sample
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    world_dir = resolve_world(cfg)
    if sc.model is None:
        model_dir = pretrain(cfg)
    else:
        from omnidiff.tracking import resolve_model

        model_dir = resolve_model(sc.model)
    evaluator = ensure_evaluator(cfg, require_fit=sc.require_fit_evaluator)
    pipe = OmniDiffusionPipeline.from_pretrained(model_dir)
    prompts = scoring.select_prompts(
        pd.read_parquet(world_dir / "eval_prompts.parquet"),
        sc.langs,
        sc.max_per_group,
        sc.images_per_prompt,
        seed=sm.seed,
    )
    t0 = time.perf_counter()
    result = scoring.prompt_faithfulness(pipe, prompts, evaluator, sm.seed, sm.steps, sm.guidance, sm.batch_size)
    generate_s = time.perf_counter() - t0
    real = scoring.load_real_images(world_dir, sc.real_images, evaluator.resolution, seed=sm.seed)
    fd = scoring.frechet_distance(evaluator.features(result.images), evaluator.features(real))
    fd_real = scoring.frechet_distance(
        evaluator.features(real[: len(real) // 2]), evaluator.features(real[len(real) // 2 :])
    )

    summary = result.summary
    headline = {
        "short_en": {a: scoring.lookup(summary, a, "en", scoring.SHORT) for a in (*evaluator.labels, scoring.ALL)},
        "zh": {a: scoring.lookup(summary, a, "zh") for a in (*evaluator.labels, scoring.ALL)},
        "short_zh": {a: scoring.lookup(summary, a, "zh", scoring.SHORT) for a in (*evaluator.labels, scoring.ALL)},
        "long_en": {a: scoring.lookup(summary, a, "en", scoring.LONG) for a in (*evaluator.labels, scoring.ALL)},
        "long_all_langs": {a: scoring.lookup(summary, a, None, scoring.LONG) for a in (*evaluator.labels, scoring.ALL)},
    }
    report = {
        "command": command,
        "model": str(model_dir),
        "evaluator": str(evaluator.path),
        "evaluator_heldout_accuracy": evaluator.accuracy,
        "evaluator_fit": evaluator.fit,
        "images": len(result.images),
        "prompts": int(len(prompts) // sc.images_per_prompt),
        "generate_s": generate_s,
        "frechet_distance": fd,
        "frechet_distance_real_vs_real": fd_real,
        "headline": headline,
    }
    key = hashlib.sha256(f"{model_dir}|{json.dumps(report['evaluator'])}".encode()).hexdigest()[:12]
    out_dir = Path(sc.out_dir) if sc.out_dir is not None else subdir("reports", "base_score", key)
    out_dir.mkdir(parents=True, exist_ok=True)
    result.per_prompt.to_parquet(out_dir / "per_prompt.parquet")
    summary.to_csv(out_dir / "summary.csv", index=False)
    grids = scoring.image_grids(result.per_prompt, result.images)
    for lang, grid in grids.items():
        grid.save(out_dir / f"grid_{lang}.png")
    (out_dir / "score.json").write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    report["out_dir"] = str(out_dir)

    table = scoring.pivot(summary)
    print(table.to_string(float_format=lambda v: f"{v:.2f}"))
    print(f"Fréchet distance (evaluator features) generated vs real: {fd:.2f} (real vs real: {fd_real:.2f})")
    for name, values in headline.items():
        print(f"{name:>15}: " + ", ".join(f"{k} {v:.0%}" for k, v in values.items()))
    print(f"report: {out_dir}")
    if cfg.track:
        _log_score(cfg, report, summary, grids, out_dir)
    return report


def _log_score(cfg: BaseConfig, report: dict, summary, grids: dict, out_dir: Path) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    from omnidiff import scoring, tracking

    with tracking.start_run("base-score", config=cfg, tags={"model": report["model"]}):
        for row in summary.itertuples():
            mlflow.log_metric(
                f"faithfulness.{row.attribute}.{row.lang}.{'short' if row.length == scoring.SHORT else 'long'}",
                row.faithfulness,
            )
        mlflow.log_metrics({"frechet_distance": report["frechet_distance"], "generate_s": report["generate_s"]})
        fig = scoring.faithfulness_figure(summary, title=f"base model: {Path(report['model']).name}")
        tracking.log_figure(fig, "faithfulness.png")
        plt.close(fig)
        for lang, grid in grids.items():
            mlflow.log_image(grid, f"grids/{lang}.png")
        mlflow.log_artifacts(str(out_dir), "report")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(BaseConfig, args.config, args.overrides)
    except ConfigError as exc:
        print(f"omnidiff base {args.command}: {exc}", file=sys.stderr)
        return 2
    command = "omnidiff base " + " ".join(shlex.quote(a) for a in argv)
    if args.command == "pretrain":
        from omnidiff.base.pretrain import pretrain

        print(pretrain(cfg))
    elif args.command == "evaluator":
        from omnidiff.base.evaluator_train import train_evaluator
        from omnidiff.models.evaluator import load_evaluator

        folder = train_evaluator(cfg)
        evaluator = load_evaluator(folder, require_fit=False)
        print(
            json.dumps(
                {"evaluator": str(folder), "heldout_accuracy": evaluator.accuracy, "fit_to_judge": evaluator.fit},
                indent=2,
            )
        )
        if not evaluator.fit:
            print(
                "omnidiff base evaluator: the evaluator is below 95% held-out accuracy on some attribute and is "
                "not fit to judge; raise evaluator.steps or evaluator.train_images",
                file=sys.stderr,
            )
            return 1
    else:
        from omnidiff.models.evaluator import EvaluatorUnfitError

        try:
            score(cfg, command)
        except EvaluatorUnfitError as exc:
            print(f"omnidiff base score: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
