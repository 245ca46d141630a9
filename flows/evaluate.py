"""Prefect flow around the evaluate stage (train/evaluate.py): models -> per-language, per-length table.

    python -m flows.evaluate omnidiff-tiny@candidate
"""

from __future__ import annotations

import sys
from typing import Any

from prefect import flow

from train.eval_config import EvalConfig


@flow(name="evaluate", log_prints=True)
def evaluate_flow(models: dict[str, str], cfg: EvalConfig) -> dict[str, Any]:
    """Score ``models`` (label -> registry ref or pipeline folder) against the baseline; returns the report."""
    from omnidiff.stack import apply_env
    from train.evaluate import evaluate, format_table

    apply_env()
    report = evaluate(models, cfg)
    print(format_table(report))
    return report.to_dict()


if __name__ == "__main__":
    from omnidiff.config import load_config
    from train.evaluate_cli import parse_models

    evaluate_flow(parse_models(sys.argv[1:]), load_config(EvalConfig, "configs/evaluate.yaml"))
