"""``omnidiff evaluate``: score models per language and prompt length against the base model.

    omnidiff evaluate omnidiff-tiny@candidate
    omnidiff evaluate base=base stage1=omnidiff-tiny/1 stage2=omnidiff-tiny/2 stage3=omnidiff-tiny/3
    omnidiff evaluate --compare omnidiff-tiny/2 omnidiff-tiny/3
    omnidiff evaluate path/to/pipeline_folder --config configs/evaluate.yaml -o max_per_group=8

A MODEL is a registry reference (name@alias, name/version), a pipeline folder, or label=reference.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from omnidiff.config import ConfigError, load_config
from train.eval_config import EvalConfig


def parse_models(items: list[str]) -> dict[str, str]:
    """``["a=x", "y"]`` -> ``{"a": "x", "y": "y"}``; a duplicate label is an error."""
    out: dict[str, str] = {}
    for item in items:
        label, sep, ref = item.partition("=")
        if not sep:
            label, ref = item, item
        if not label or not ref:
            raise ValueError(f"model {item!r}: expected REF or LABEL=REF")
        if label in out:
            raise ValueError(f"model label {label!r} given twice")
        out[label] = ref
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="omnidiff evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help="REF or LABEL=REF (registry ref or pipeline folder)")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two models side by side (no baseline)")
    parser.add_argument("--config", default="configs/evaluate.yaml")
    parser.add_argument("-o", "--override", action="append", default=[], help="dotted.key=value")
    args = parser.parse_args(argv)
    if not args.models and not args.compare:
        parser.error("give at least one MODEL, or --compare A B")
    try:
        overrides = list(args.override)
        if args.compare:
            overrides.append("baseline=none")
        cfg = load_config(EvalConfig, args.config, overrides)
        models = parse_models(args.compare or args.models)
    except (ConfigError, ValueError) as exc:
        print(f"omnidiff evaluate: {exc}", file=sys.stderr)
        return 2
    from omnidiff.stack import apply_env
    from train.evaluate import evaluate, format_table

    apply_env()
    report = evaluate(models, cfg, command="omnidiff evaluate " + " ".join(shlex.quote(a) for a in argv))
    print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
