"""Download images with img2dataset in a subprocess, and turn its per-row results into quarantine reasons.

img2dataset does the work: its distributor (multiprocessing or Ray), the shard as
the unit of work, per-url retries, resizing, and incremental mode (a shard with a
``*_stats.json`` beside it is done and skipped on the next run). It must run
under ``__main__`` (it spawns processes, NOTES.md), so :func:`run_img2dataset`
starts this module as a subprocess:

    .venv/bin/python -m data_prep.download <work_dir>/spec.json

The subprocess gets its own process group, so a run killed halfway (SIGKILL to
the group) leaves finished shards with their stats files and unfinished ones
without; the next run re-downloads only those. Only shards with a stats file are
ever read, so a half-written shard is never seen.

One addition to img2dataset: :class:`data_prep.resizer.CheckingResizer` wraps its
resizer to say why a payload is not an image (see there). The error strings
img2dataset records per row are mapped to machine-readable reasons by
:func:`reason_for`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.config import CollectConfig, DownloadConfig
from omnidiff.env import subdir
from omnidiff.progress import Progress

REPO = Path(__file__).resolve().parents[1]

if __name__ in ("__main__", "__mp_main__"):
    # Only in the download subprocess and its spawned workers (which re-run this module as
    # __mp_main__ before unpickling their work): img2dataset imports webdataset, which imports
    # torch (2-7 s per process on 2 busy cores) for a PyTorch integration the parquet writer never
    # uses; webdataset has fallbacks for a missing torch.
    sys.modules.setdefault("torch", None)  # type: ignore[arg-type]


class DownloadError(RuntimeError):
    """img2dataset did not finish every shard (killed, crashed, a shard kept failing).

    Transient: a rerun resumes from the finished shards (the Prefect flow retries it).
    """


# ---------------------------------------------------------------------------------------------
# img2dataset error message -> quarantine reason
# ---------------------------------------------------------------------------------------------

_REASON_RULES: list[tuple[re.Pattern, str]] = [
    (re.compile(r"image too large|image area too large|decompression bomb", re.I), "too_large"),
    (re.compile(r"image too small", re.I), "too_small"),
    (re.compile(r"aspect ratio too large", re.I), "bad_aspect_ratio"),
    (re.compile(r"not an image", re.I), "not_an_image"),
    (re.compile(r"truncated", re.I), "truncated_image"),
    (re.compile(r"Image decoding error|decode error", re.I), "decode_error"),
    (re.compile(r"Connection refused", re.I), "connection_refused"),
    (re.compile(r"timed out|timeout", re.I), "timeout"),
    (re.compile(r"unknown url type|no host given|can't contain control characters|nonnumeric port|"
                r"Invalid URL|Invalid IPv6|port out of range", re.I), "malformed_url"),
    (re.compile(r"Name or service not known|nodename nor servname|name resolution|getaddrinfo", re.I),
     "dns_error"),
    (re.compile(r"IncompleteRead", re.I), "incomplete_download"),
    (re.compile(r"Connection reset|Remote end closed|RemoteDisconnected|BadStatusLine|Connection aborted|"
                r"EOF occurred|Broken pipe", re.I), "connection_error"),
    (re.compile(r"CERTIFICATE_VERIFY_FAILED|SSL", re.I), "ssl_error"),
    (re.compile(r"X-Robots-Tag", re.I), "disallowed_by_robots"),
    (re.compile(r"hash mismatch", re.I), "hash_mismatch"),
]
_HTTP_ERROR = re.compile(r"HTTP Error (\d{3})")


def reason_for(status: str | None, error_message: str | None) -> str | None:
    """Machine-readable reason for one img2dataset result row; None for a success.

    >>> reason_for("failed_to_download", "HTTP Error 404: Not Found")
    'http_404'
    >>> reason_for("failed_to_download", "<urlopen error [Errno 111] Connection refused>")
    'connection_refused'
    """
    if status == "success":
        return None
    message = error_message or ""
    http = _HTTP_ERROR.search(message)
    if http:
        return f"http_{http.group(1)}"
    for pattern, reason in _REASON_RULES:
        if pattern.search(message):
            return reason
    if status == "failed_to_resize":
        return "resize_error"
    return "download_error"


# ---------------------------------------------------------------------------------------------
# the download input
# ---------------------------------------------------------------------------------------------


def download_hasher(cfg: CollectConfig):
    """A sha256 fed the settings that change img2dataset's output; :func:`add_download_rows` feeds it the rows."""
    d = cfg.download
    h = hashlib.sha256()
    settings = [d.image_size, d.resize_mode, d.encode_format, d.encode_quality, d.shard_rows, d.max_image_bytes,
                d.max_image_pixels, d.min_image_size, d.verify_images]
    h.update(json.dumps(settings).encode())
    return h


def add_download_rows(h, urls: list[str], row_ids: list[int]) -> None:
    for url, row_id in zip(urls, row_ids, strict=True):
        h.update(f"\n{row_id}\t{url}".encode("utf-8", "surrogatepass"))


def download_work_dir_of(cfg: CollectConfig, h) -> Path:
    return subdir("data", "collect", cfg.name, "downloads", h.hexdigest()[:16])


def place_download_input(work_dir: Path, written: Path) -> Path:
    """Move an input file written batch by batch (url, row_id) into ``work_dir`` unless one is there already."""
    path = work_dir / "input.parquet"
    if not path.is_file():
        tmp = work_dir / ".input.parquet.tmp"
        shutil.move(str(written), tmp)
        tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# running img2dataset
# ---------------------------------------------------------------------------------------------


def shard_digits(n_shards: int) -> int:
    """img2dataset's ``oom_shard_count``: digits in shard file names."""
    return max(5, len(str(max(n_shards - 1, 0))))


def expected_shards(n_rows: int, shard_rows: int) -> int:
    return math.ceil(n_rows / shard_rows)


def shard_paths(output_dir: Path, shard_id: int, digits: int) -> tuple[Path, Path]:
    name = f"{shard_id:0{digits}d}"
    return output_dir / f"{name}.parquet", output_dir / f"{name}_stats.json"


def done_shards(output_dir: Path, n_shards: int) -> list[int]:
    digits = shard_digits(n_shards)
    return [i for i in range(n_shards) if shard_paths(output_dir, i, digits)[1].is_file()]


def img2dataset_kwargs(cfg: DownloadConfig, input_path: Path, output_dir: Path, n_rows: int) -> dict:
    """Arguments of ``img2dataset.download`` for our input table (columns url, row_id)."""
    return {
        "url_list": str(input_path),
        "input_format": "parquet",
        "url_col": "url",
        "save_additional_columns": ["row_id"],
        "output_format": "parquet",  # keeps the image bytes next to status/error_message
        "output_folder": str(output_dir),
        "image_size": cfg.image_size,
        "resize_mode": cfg.resize_mode,
        "encode_format": cfg.encode_format,
        "encode_quality": cfg.encode_quality,
        "processes_count": cfg.processes,
        "thread_count": cfg.threads,
        "distributor": cfg.distributor,
        "number_sample_per_shard": cfg.shard_rows,
        "oom_shard_count": shard_digits(expected_shards(n_rows, cfg.shard_rows)),
        "timeout": cfg.timeout_s,
        "retries": cfg.retries,
        "max_shard_retry": cfg.max_shard_retry,
        "max_image_area": float(cfg.max_image_pixels),
        "min_image_size": cfg.min_image_size,
        "incremental_mode": "incremental",
        "extract_exif": False,
        "compute_hash": "sha256",
        "user_agent_token": cfg.user_agent_token,
        "enable_wandb": False,
    }


def run_img2dataset(
    cfg: DownloadConfig,
    input_path: Path,
    work_dir: Path,
    n_rows: int,
    progress_every_s: float = 5.0,
) -> dict:
    """Download every row of ``input_path`` (url, row_id) into ``work_dir/shards``; resumes finished shards.

    Returns {"shards": n, "shards_new": k, "output_dir": path, "seconds": s}. Starts no
    subprocess when every shard is already done. Raises DownloadError when img2dataset
    exits without finishing every shard (its log tail is in the message).
    """
    output_dir = work_dir / "shards"
    n_shards = expected_shards(n_rows, cfg.shard_rows)
    already = done_shards(output_dir, n_shards)
    result = {"shards": n_shards, "shards_new": n_shards - len(already), "output_dir": str(output_dir),
              "seconds": 0.0}
    if len(already) == n_shards:
        return result
    spec = {
        "kwargs": img2dataset_kwargs(cfg, input_path, output_dir, n_rows),
        "max_image_bytes": cfg.max_image_bytes,
        "verify_images": cfg.verify_images,
    }
    spec_path = work_dir / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1))
    log_path = work_dir / "img2dataset.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    start = time.perf_counter()
    with open(log_path, "ab") as log, Progress("download", total=n_rows, unit="img", every_s=progress_every_s) as p:
        proc = subprocess.Popen(
            [sys.executable, "-m", "data_prep.download", str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(work_dir),
            start_new_session=True,  # own process group: killing it takes img2dataset's workers too
        )
        (work_dir / "download.pid").write_text(str(proc.pid))
        counted = len(already)
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                now = len(done_shards(output_dir, n_shards))
                if now > counted:
                    p.update(_rows_in(output_dir, range(counted, now), n_shards, n_rows, cfg.shard_rows))
                    counted = now
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            (work_dir / "download.pid").unlink(missing_ok=True)
        now = len(done_shards(output_dir, n_shards))
        p.done = n_rows if now == n_shards else p.done
    result["seconds"] = time.perf_counter() - start
    missing = sorted(set(range(n_shards)) - set(done_shards(output_dir, n_shards)))
    if proc.returncode != 0 or missing:
        how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
               else f"exited with status {proc.returncode}")
        raise DownloadError(
            f"img2dataset {how}; {len(missing)} of {n_shards} shards unfinished (e.g. {missing[:5]}); "
            f"rerun to resume. Log {log_path}:\n{_tail(log_path)}"
        )
    return result


def _rows_in(output_dir: Path, ids: range, n_shards: int, n_rows: int, shard_rows: int) -> int:
    # Shards finish in any order; count rows by shard size (the last one is short).
    return sum(min(shard_rows, n_rows - i * shard_rows) for i in ids)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _tail(path: Path, n_chars: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n_chars:]


RESULT_COLUMNS = ["row_id", "status", "error_message", "width", "height", "original_width", "original_height",
                  "sha256"]


def read_shard(output_dir: Path, shard_id: int, n_shards: int, encode_format: str) -> pa.Table:
    """One finished img2dataset shard: RESULT_COLUMNS + ``image`` (bytes or null), sorted by row_id."""
    parquet_path, stats_path = shard_paths(output_dir, shard_id, shard_digits(n_shards))
    if not stats_path.is_file():
        raise DownloadError(f"img2dataset shard {parquet_path} is not finished (no {stats_path.name})")
    table = pq.read_table(parquet_path, columns=RESULT_COLUMNS + [encode_format])
    table = table.rename_columns(RESULT_COLUMNS + ["image"])
    return table.sort_by("row_id")


# ---------------------------------------------------------------------------------------------
# the subprocess
# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry of the img2dataset subprocess: ``python -m data_prep.download spec.json``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 1:
        print("usage: python -m data_prep.download SPEC.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    import importlib

    # img2dataset/__init__.py re-exports a function called `main`, which shadows the module of that name.
    img2dataset_main = importlib.import_module("img2dataset.main")

    # img2dataset builds its resizer from this module-level name; ours adds the checks above.
    # Imported by its package name so worker processes and Ray workers can unpickle it.
    from data_prep.resizer import CheckingResizer

    img2dataset_main.Resizer = functools.partial(
        CheckingResizer, max_image_bytes=spec["max_image_bytes"], verify_images=spec["verify_images"]
    )
    kwargs = spec["kwargs"]
    if kwargs["distributor"] == "ray":
        import ray

        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 log_to_driver=False, ignore_reinit_error=True)
    img2dataset_main.download(**kwargs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
