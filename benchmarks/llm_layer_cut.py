"""Encoder tokens/s for a middle layer: the body cut after that layer against the whole body (issue 18 item 5).

    nice .venv/bin/python benchmarks/llm_layer_cut.py                    # converted Gemma 3 270M, layer 9
    nice .venv/bin/python benchmarks/llm_layer_cut.py --layer 6 --captions 128 --rounds 3 --llm PATH

Both encoders are ``LLMTextEncoder`` with the same settings; the baseline is the same class with the cut
turned off (``TRUNCATABLE_MODEL_TYPES`` emptied), i.e. what it ran before. Rounds alternate cut / whole
over the same captions (a multilingual mix of 10-60 tokens), so load on a shared machine hits both alike;
it prints tokens/s of each round, the median ratio, and checks that the states are bitwise the same.

Measured 2026-12-07 (2 cores shared with a running demo, `--captions 96 --rounds 4`): cut 259 tok/s, whole
143 tok/s, median ratio 1.82x (rounds 2.12, 1.75, 1.89, 1.71); states bitwise equal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

BASES = [
    "a red circle on the left of a small blue square",
    "左边有一个红色的圆，右边有一个蓝色的小方块",
    "un carré bleu en haut à droite, très petit, à côté d'un triangle vert",
    "ein gelbes Dreieck unten links neben einem großen violetten Kreis",
    "赤い円が左にあり、右に小さな青い四角形がある",
    "красный круг слева от маленького синего квадрата",
    "왼쪽에 빨간 원이 있고 오른쪽에 작은 파란 사각형이 있다",
    "un cerchio rosso a sinistra di un piccolo quadrato blu, sopra una linea orizzontale arancione",
]


def captions(n: int) -> list[str]:
    """``n`` distinct captions: the bases with 0-3 more clauses and a number, so lengths vary."""
    out = []
    for i in range(n):
        base = BASES[i % len(BASES)]
        extra = ", ".join(BASES[(i + j) % len(BASES)] for j in range(1, 1 + i % 4))
        out.append(f"{base} {i}" + (f", {extra}" if extra else ""))
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    from omnidiff.models import llm as llm_module
    from omnidiff.models.llm import LLMTextEncoder
    from omnidiff.models.llm_folders import gemma_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--llm", default=None, help="LLM folder (default: the converted Gemma)")
    parser.add_argument("--layer", type=int, default=9)
    parser.add_argument("--captions", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    path = Path(args.llm) if args.llm else gemma_folder()

    cut = LLMTextEncoder(path, layer=args.layer, batch_size=args.batch_size)
    types = llm_module.TRUNCATABLE_MODEL_TYPES
    llm_module.TRUNCATABLE_MODEL_TYPES = frozenset()
    try:
        whole = LLMTextEncoder(path, layer=args.layer, batch_size=args.batch_size)
    finally:
        llm_module.TRUNCATABLE_MODEL_TYPES = types
    texts = captions(args.captions)
    tokens = sum(cut.token_lengths(texts))
    print(f"{path.name}: layer {args.layer}, cut body runs {cut.run_layers} of {whole.run_layers} layers; "
          f"{len(texts)} captions, {tokens} tokens, {torch.get_num_threads()} threads", flush=True)
    cut.encode(texts[:4])  # warm-up
    whole.encode(texts[:4])
    rates: dict[str, list[float]] = {"cut": [], "whole": []}
    outputs = {}
    for r in range(args.rounds):
        for name, enc in (("cut", cut), ("whole", whole)) if r % 2 == 0 else (("whole", whole), ("cut", cut)):
            start = time.perf_counter()
            outputs[name] = enc.encode(texts)
            seconds = time.perf_counter() - start
            rates[name].append(tokens / seconds)
            print(f"  round {r} {name:5s}: {seconds:6.2f} s  {tokens / seconds:7.0f} tok/s", flush=True)
    same = torch.equal(outputs["cut"][0], outputs["whole"][0]) and torch.equal(outputs["cut"][1], outputs["whole"][1])
    ratios = [c / w for c, w in zip(rates["cut"], rates["whole"], strict=True)]
    print(f"cut {statistics.median(rates['cut']):.0f} tok/s, whole {statistics.median(rates['whole']):.0f} tok/s, "
          f"ratio {statistics.median(ratios):.2f}x (rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"states bitwise equal: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
