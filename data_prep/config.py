"""The collect stage's config: url lists in, a pair snapshot out.

    .venv/bin/omnidiff collect --config configs/collect.yaml download.processes=4

Every field is documented in its model's docstring; validation names the
dotted key and the bad value (omnidiff.config).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, model_validator

from omnidiff.config import ConfigModel, NonBlank, require
from omnidiff.contracts.storage import Location, StorageSection
from omnidiff.text import DEFAULT_MAX_CHARS

_NAME = r"^[A-Za-z0-9_-]+$"  # a snapshot name becomes a folder name


class ColumnsConfig(ConfigModel):
    """Column names of a url list. ``None`` = look for the usual names.

    url: the image url column (auto: ``url``, ``URL``, ``image_url``).
    caption: the caption column (auto: ``caption``, ``TEXT``, ``text``).
    lang: the declared language column, optional (auto: ``lang``, ``LANGUAGE``, ``language``).
    caption_en: an English translation of the caption, optional (auto: ``caption_en``,
        ``ENG TEXT``, ``text_en``, ``TEXT_EN``).
    """

    url: str | None = None
    caption: str | None = None
    lang: str | None = None
    caption_en: str | None = None


class ParallelColumnsConfig(ConfigModel):
    """Column names of a parallel-text file (text in language X + its English, no image).

    text: the non-English side (auto: ``text``, ``TEXT``, ``caption``).
    text_en: the English side (auto: ``text_en``, ``caption_en``, ``en``, ``english``, ``ENG TEXT``).
    lang: the language of ``text``, optional (auto: ``lang``, ``LANGUAGE``, ``language``).
    """

    text: str | None = None
    text_en: str | None = None
    lang: str | None = None


class DownloadConfig(ConfigModel):
    """img2dataset settings (https://github.com/rom1504/img2dataset, its ``download`` arguments).

    image_size: side of the stored images in pixels (16 for the tiny world).
    resize_mode: img2dataset's resize mode (``border`` pads to a square).
    encode_format: format of the stored image bytes; png is lossless, so the world's
        clean/degraded difference survives exactly.
    encode_quality: img2dataset's encode quality; for png it is the zlib level 0-9.
    processes: img2dataset processes (its distributor's workers).
    threads: download threads per process.
    distributor: ``multiprocessing`` (one machine) or ``ray`` (the Ray cluster at
        RAY_ADDRESS; the work dir must then be on storage every node sees).
    shard_rows: rows per img2dataset shard: the unit of work and of resume.
    timeout_s: per-request timeout.
    retries: per-url retries inside img2dataset.
    max_shard_retry: how often img2dataset retries a failed shard in one run.
    max_image_bytes: larger responses are quarantined as ``too_large``.
    max_image_pixels: images with more pixels (width*height) are quarantined as ``too_large``
        before they are decoded.
    min_image_size: images whose shorter side is smaller are quarantined as ``too_small``.
    verify_images: check the magic bytes and decode the whole image before img2dataset
        resizes it, so non-images and truncated files get their own quarantine reasons
        (img2dataset alone calls both "Image decoding error", and OpenCV pads some
        truncated JPEGs with grey instead of failing).
    user_agent_token: sent in the User-Agent; X-Robots-Tag directives for it are honoured.
    """

    image_size: int = Field(16, ge=1)
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_format: Literal["png", "jpg", "webp"] = "png"
    encode_quality: int = 9
    processes: int = Field(2, ge=1)
    threads: int = Field(16, ge=1)
    distributor: Literal["multiprocessing", "ray"] = "multiprocessing"
    shard_rows: int = Field(1000, ge=1)
    timeout_s: int = Field(10, ge=1)
    retries: int = Field(1, ge=0)
    max_shard_retry: int = Field(1, ge=0)
    max_image_bytes: int = Field(20_000_000, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    min_image_size: int = Field(0, ge=0)
    verify_images: bool = True
    user_agent_token: NonBlank = "omnidiff"

    @model_validator(mode="after")
    def _quality_fits_format(self) -> DownloadConfig:
        if self.encode_format == "png":
            require(0 <= self.encode_quality <= 9, "encode_quality", self.encode_quality,
                    "png compression level must be 0-9")
        else:
            require(0 <= self.encode_quality <= 100, "encode_quality", self.encode_quality,
                    "jpg/webp quality must be 0-100")
        return self


class CollectConfig(ConfigModel):
    """Collect image-caption pairs from url lists into a versioned pair snapshot (DESIGN.md, stage 1).

    name: snapshot name: the snapshot lands in ``$OMNIDIFF_HOME/data/snapshots/<name>/<digest16>/``
        (``<storage.root>/data/snapshots/...`` with a storage root, or ``snapshot_root``).
    url_lists: url list files or folders of them (.parquet, .csv, .tsv, .jsonl, optionally .gz).
        Relative paths are taken from the current directory, else from $OMNIDIFF_HOME. An
        ``s3://bucket/prefix`` names one object or every supported object under that prefix (copied
        into the run's temporary folder first, then scanned as a local list; the manifest names the URL).
    parallel_lists: parallel-text files (text in language X + English, no image), same formats.
    columns: column names of the url lists (LAION and img2dataset names work unset).
    parallel_columns: column names of the parallel-text files.
    download: img2dataset settings.
    max_caption_chars: longest caption kept, in characters after normalisation.
    long_caption: what happens to a longer caption: ``quarantine`` (reason
        ``caption_too_long``; the default: a 100 KB "caption" is scraped page text, and a
        cut one no longer says what the image shows) or ``truncate`` (cut at the limit, kept).
    lang_min_score: a row is flagged ``lang_mismatch`` only when the detector's top language
        differs from the declared one with at least this confidence (short captions are
        ambiguous: "a red circle" scores ~0.4 for English).
    aesthetic_scorer: registry name (``image_quality``) or ``module:attribute`` of a scorer
        factory; see data_prep/aesthetic.py.
    aesthetic_options: keyword arguments for the scorer factory (e.g. local weight paths).
    aesthetic_batch_size: images per scorer call.
    val_fraction: share of keys in the ``val`` split (by key hash, so stable across runs).
    output_shard_rows: rows per snapshot Parquet shard at most.
    read_batch_rows: url-list rows read, checked and language-identified at once (one worker task);
        with ``dedup_partition_rows`` it sets the stage's peak memory, which does not grow with the lists.
    workers: worker processes for the checks, language identification and aesthetic scores
        (1: in the driver process). Downloading uses ``download.processes``.
    dedup_partition_rows: rows per partition of the duplicate search (keys are hash-partitioned into
        spill files under the run's temporary folder, one partition in memory at a time).
    track: log the run to MLflow (omnidiff.tracking).
    snapshot_root: where ``<name>/<digest16>/`` snapshots go: a folder or ``s3://bucket/prefix``;
        ``null`` = ``<storage.root>/data/snapshots``, else ``$OMNIDIFF_HOME/data/snapshots``.
    storage: default root and S3 endpoint / credentials (omnidiff/contracts/storage.py ``StorageSection``).
    """

    kind: ClassVar[str] = "collect"

    name: str = Field("tiny", pattern=_NAME)
    url_lists: tuple[Location, ...] = ()
    parallel_lists: tuple[Location, ...] = ()
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    parallel_columns: ParallelColumnsConfig = Field(default_factory=ParallelColumnsConfig)
    download: DownloadConfig = Field(default_factory=DownloadConfig)
    max_caption_chars: int = Field(DEFAULT_MAX_CHARS, ge=1)
    long_caption: Literal["quarantine", "truncate"] = "quarantine"
    lang_min_score: float = Field(0.3, ge=0.0, le=1.0)
    aesthetic_scorer: NonBlank = "image_quality"
    aesthetic_options: dict[str, Any] = Field(default_factory=dict)
    aesthetic_batch_size: int = Field(256, ge=1)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    output_shard_rows: int = Field(5000, ge=1)
    read_batch_rows: int = Field(4096, ge=1)
    workers: int = Field(1, ge=1)
    dedup_partition_rows: int = Field(1_000_000, ge=1)
    track: bool = True
    snapshot_root: Location | None = None
    storage: StorageSection = Field(default_factory=StorageSection)

    @model_validator(mode="after")
    def _has_url_lists(self) -> CollectConfig:
        require(len(self.url_lists) > 0, "url_lists", list(self.url_lists), "give at least one url list")
        return self
