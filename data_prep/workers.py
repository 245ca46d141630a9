"""The collect stage's per-row work in parallel worker processes: checks + language id per batch, aesthetic scores.

A batch of url-list (or parallel-text) rows goes to a worker as an Arrow table and comes back as
the computed columns (normalised caption, reason, detail, language...); images go as chunks of
``aesthetic_batch_size`` encoded images and come back as scores. :meth:`WorkerPool.map` returns the
results in submission order, so the output is the same whatever the number of workers (issue 17).
Each worker loads the language detector and the aesthetic scorer once, on first use (STYLE.md 6).
``workers=1`` does the work in this process, with no pool.

Workers are spawned (not forked): the driver holds pyarrow's and the detector's threads, which a fork
would copy in whatever state they are in.
"""

from __future__ import annotations

import json
import multiprocessing
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

# Per process: the loaded detector and scorers (a worker keeps them between tasks).
_LOADED: dict[Any, Any] = {}


def _detector():
    if "detector" not in _LOADED:
        from data_prep.langid import LanguageDetector

        _LOADED["detector"] = LanguageDetector()
    return _LOADED["detector"]


def _scorer(name: str, options: dict):
    key = ("scorer", name, json.dumps(options, sort_keys=True, default=str))
    if key not in _LOADED:
        from data_prep.aesthetic import build_scorer

        _LOADED[key] = build_scorer(name, options)
    return _LOADED[key]


def _language_columns(batch: pa.Table, checks: dict[str, list], text: str, lang_min_score: float) -> dict[str, pa.Array]:
    """lang, lang_detected, lang_score, lang_mismatch of the rows the checks passed (null where rejected);
    ``text`` names the checked column the detector reads."""
    from data_prep.langid import assign_languages

    passing = [i for i, reason in enumerate(checks["reason"]) if reason is None]
    declared = batch.column("lang_declared").to_pylist()
    langs = assign_languages([checks[text][i] for i in passing], [declared[i] for i in passing], _detector(),
                             lang_min_score)
    lang_cols = {name: [None] * batch.num_rows for name in langs}
    for j, i in enumerate(passing):
        for name, values in langs.items():
            lang_cols[name][i] = values[j]
    return {"lang": pa.array(lang_cols["lang"], pa.string()),
            "lang_detected": pa.array(lang_cols["lang_detected"], pa.string()),
            "lang_score": pa.array(lang_cols["lang_score"], pa.float32()),
            "lang_mismatch": pa.array(lang_cols["lang_mismatch"], pa.bool_())}


def check_pairs_batch(batch: pa.Table, max_chars: int, long_caption: str, lang_min_score: float) -> pa.Table:
    """url-list rows (url, caption_raw, caption_en_raw, lang_declared) -> per row: caption, caption_en, reason,
    detail, download_url (the stripped url), lang, lang_detected, lang_score, lang_mismatch (null where rejected)."""
    from data_prep.normalise import check_rows

    urls = batch.column("url").to_pylist()
    checks = check_rows(urls, batch.column("caption_raw").to_pylist(), batch.column("caption_en_raw").to_pylist(),
                        max_chars, long_caption)
    lang_cols = _language_columns(batch, checks, "caption", lang_min_score)
    download_url = [u.strip() if r is None else None for u, r in zip(urls, checks["reason"], strict=True)]
    return pa.table({"caption": pa.array(checks["caption"], pa.string()),
                     "caption_en": pa.array(checks["caption_en"], pa.string()),
                     "reason": pa.array(checks["reason"], pa.string()),
                     "detail": pa.array(checks["detail"], pa.string()),
                     "download_url": pa.array(download_url, pa.string()),
                     **lang_cols})


def check_parallel_batch(batch: pa.Table, max_chars: int, long_caption: str, lang_min_score: float) -> pa.Table:
    """parallel-text rows (text_raw, text_en_raw, lang_declared) -> per row: text, text_en, reason, detail, key,
    lang, lang_detected, lang_score, lang_mismatch (null where rejected)."""
    from data_prep.normalise import check_parallel_rows
    from data_prep.parallel import parallel_key

    checks = check_parallel_rows(batch.column("text_raw").to_pylist(), batch.column("text_en_raw").to_pylist(),
                                 max_chars, long_caption)
    lang_cols = _language_columns(batch, checks, "text", lang_min_score)
    n = batch.num_rows
    keys = [parallel_key(checks["text"][i], checks["text_en"][i]) if checks["reason"][i] is None else None
            for i in range(n)]
    return pa.table({"text": pa.array(checks["text"], pa.string()),
                     "text_en": pa.array(checks["text_en"], pa.string()),
                     "reason": pa.array(checks["reason"], pa.string()),
                     "detail": pa.array(checks["detail"], pa.string()),
                     "key": pa.array(keys, pa.string()),
                     **lang_cols})


def score_images(images: list[bytes], scorer: str, options: dict) -> list[float]:
    """Aesthetic scores of encoded images (one scorer call)."""
    from data_prep.aesthetic import decode_rgb

    batch = [decode_rgb(b) for b in images]  # list of uint8 (H, W, 3)
    scores = np.asarray(_scorer(scorer, options)(batch), np.float32).reshape(-1).tolist()
    if len(scores) != len(images):
        raise RuntimeError(f"aesthetic scorer {scorer!r} returned {len(scores)} scores for {len(images)} images")
    return scores


class WorkerPool:
    """``map(fn, items)`` over ``workers`` processes, results in submission order, at most ``2 * workers``
    items in flight (the input is read lazily, so memory holds a few batches, not the corpus)."""

    def __init__(self, workers: int):
        self.workers = workers
        self._executor: ProcessPoolExecutor | None = None
        if workers > 1:
            self._executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))

    def map(self, fn: Callable, items: Iterable, *args) -> Iterator[tuple[Any, Any]]:
        """(item, fn(item, *args)) for every item, in order."""
        if self._executor is None:
            for item in items:
                yield item, fn(item, *args)
            return
        pending: deque[tuple[Any, Future]] = deque()
        for item in items:
            pending.append((item, self._executor.submit(fn, item, *args)))
            if len(pending) >= 2 * self.workers:
                done, future = pending.popleft()
                yield done, future.result()
        while pending:
            done, future = pending.popleft()
            yield done, future.result()

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
