"""Which half of the adapter's conditioning fails? Swap tokens and pooled embedding between CLIP and the adapter.

    .venv/bin/python benchmarks/conditioning_probe.py ADAPTER_EXPORT BASE_MODEL WORLD_DIR EVALUATOR_DIR \
        [--lang zh --prompts 32]

An adapter export (stage 1: the base UNet + the adapter) is sampled four ways on the world's short
eval prompts of one language, and the evaluator scores each attribute:

  tokens=clip     pooled=clip      the base model (CLIP of the prompt's English side)
  tokens=adapter  pooled=adapter   the export as it is
  tokens=clip     pooled=adapter   only the pooled embedding from the adapter
  tokens=adapter  pooled=clip      only the token states from the adapter

Found with it (README "Where it stands"): after stage 1 the pooled embedding is good enough (CLIP
tokens + adapter pooled score like the base), the token states are not (adapter tokens + CLIP
pooled score near chance), so the token alignment is what to improve.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ATTRIBUTES = ("shape", "colour", "position", "size", "background")


def main() -> None:
    import pandas as pd
    import torch

    from omnidiff.models.evaluator import load_evaluator
    from omnidiff.pipeline import OmniDiffusionPipeline
    from omnidiff.scoring import prompt_faithfulness

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", help="an llm_adapter pipeline folder whose UNet is the base model's (stage 1)")
    parser.add_argument("base", help="the base model's pipeline folder (models/base/<hash>)")
    parser.add_argument("world", help="the world folder (eval_prompts.parquet)")
    parser.add_argument("evaluator", help="the evaluator folder (models/evaluator/<hash>)")
    parser.add_argument("--lang", default="en")
    parser.add_argument("--prompts", type=int, default=32, help="short eval prompts (at most)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    base = OmniDiffusionPipeline.from_pretrained(args.base)
    pipe = OmniDiffusionPipeline.from_pretrained(args.export)
    if base.conditioning != "clip" or pipe.conditioning != "llm_adapter":
        raise SystemExit("need a clip base model and an llm_adapter export")
    evaluator = load_evaluator(args.evaluator, require_fit=False)
    prompts = pd.read_parquet(Path(args.world) / "eval_prompts.parquet")
    prompts = prompts[(prompts["lang"] == args.lang) & ~prompts["is_long"]].head(args.prompts).reset_index(drop=True)
    if prompts.empty:
        raise SystemExit(f"no short eval prompts in {args.lang!r}")
    english = {**dict(zip(prompts["prompt"], prompts["prompt_en"], strict=True)), "": ""}
    adapter_encode = pipe.encode_prompt

    def mixed(tokens_from: str, pooled_from: str):
        def encode(batch):
            batch = [batch] if isinstance(batch, str) else list(batch)
            c_tok, c_pool, c_mask = base.encode_prompt([english.get(p, p) for p in batch])
            a_tok, a_pool, a_mask = adapter_encode(batch)
            tokens, mask = (c_tok, c_mask) if tokens_from == "clip" else (a_tok, a_mask)
            return tokens, c_pool if pooled_from == "clip" else a_pool, mask

        return encode

    print(f"{len(prompts)} short {args.lang} prompts, one image each; faithfulness per attribute")
    for tokens_from, pooled_from in (("clip", "clip"), ("adapter", "adapter"), ("clip", "adapter"),
                                     ("adapter", "clip")):
        pipe.encode_prompt = mixed(tokens_from, pooled_from)
        summary = prompt_faithfulness(pipe, prompts, evaluator).summary
        scores = "  ".join(f"{a} {summary.loc[summary['attribute'] == a, 'faithfulness'].mean():.2f}"
                           for a in ATTRIBUTES)
        print(f"tokens={tokens_from:<8} pooled={pooled_from:<8} {scores}", flush=True)


if __name__ == "__main__":
    main()
