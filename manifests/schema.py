"""The data contract: reject reasons and the Arrow schemas of the manifests.

Every input row ends in exactly one of two tables:

* ``curated`` -- rows that passed every stage, with their metadata, hashes and scores;
* ``rejected`` -- rows that did not, each with ``stage``, ``reason`` (a :class:`Reason`)
  and a human-readable ``detail``.

Columns added by a stage are listed here so the plan can check them when it is built.
"""

from __future__ import annotations

from enum import StrEnum

import pyarrow as pa


class Stage(StrEnum):
    """The pipeline's stages, in the order they run: the one vocabulary of the CLI's
    ``--until``, the manifests' ``stage`` column, the run directory
    (``stages/<stage>`` and ``stages/<stage>.<part>``), ``summary.json`` and the report.
    Each has one declaration in ``pipeline/stages/`` (the plan: ``pipeline/plan.py``)."""

    SELECT = "select"  # catalog join and subset selection, before any pixel is read
    INGEST = "ingest"  # list and read the inputs
    VALIDATE = "validate"  # decode checks, hashes, technical quality
    EMBED = "embed"  # model embeddings (in the streaming pass), cached by content
    EXACT_DEDUP = "exact_dedup"
    FILTER = "filter"  # quality thresholds, non-natural examples, aesthetic
    NEAR_DEDUP = "near_dedup"
    SAMPLE = "sample"


STAGE_ORDER = tuple(Stage)


def reaches(until: str, stage: str) -> bool:
    """Whether a run ``--until until`` runs ``stage``."""
    return STAGE_ORDER.index(Stage(stage)) <= STAGE_ORDER.index(Stage(until))


class Reason(StrEnum):
    """Why a row was rejected. One value per row, in the ``reason`` column."""

    # ingest
    MISSING = "missing"  # object or file does not exist
    PERMISSION_DENIED = "permission_denied"
    READ_ERROR = "read_error"  # permanent read failure (after retries) or broken archive
    UNSAFE_PATH = "unsafe_path"  # tar member escaping its archive, links, names that are not UTF-8
    UNSUPPORTED_URI = "unsupported_uri"  # a table's uri with a protocol not allowed (storage.allowed_protocols)
    # select
    NOT_IN_CATALOG = "not_in_catalog"  # an image whose key has no catalog row
    # validate
    EMPTY = "empty"  # zero bytes
    FILE_TOO_LARGE = "file_too_large"
    UNKNOWN_FORMAT = "unknown_format"  # content is not an image Pillow can identify
    FORMAT_NOT_ALLOWED = "format_not_allowed"
    DECOMPRESSION_BOMB = "decompression_bomb"  # header declares more pixels than allowed
    TOO_SMALL = "too_small"
    BAD_ASPECT = "bad_aspect"
    CORRUPT = "corrupt"  # decoder raised: truncated, broken stream, ...
    DECODE_TIMEOUT = "decode_timeout"
    # global steps
    EXACT_DUPLICATE = "exact_duplicate"
    PLACEHOLDER = "placeholder"  # one byte-identical image served for many inputs
    # filter (thresholds on the technical quality columns, see QualityConfig)
    UNIFORM = "uniform"  # near-uniform, no information (gray-level entropy)
    BLURRY = "blurry"  # variance of the Laplacian
    UNDEREXPOSED = "underexposed"  # fraction of crushed shadows
    OVEREXPOSED = "overexposed"  # fraction of blown highlights
    LOW_CONTRAST = "low_contrast"  # RMS contrast
    LETTERBOX = "letterbox"  # flat bars along the edges
    NONNATURAL = "nonnatural"  # near the examples of an unwanted category (detail names it)
    LOW_AESTHETIC = "low_aesthetic"  # LAION aesthetic score below aesthetic.min_score
    # near-duplicates (duplicate_of names the kept id)
    PERCEPTUAL_DUPLICATE = "perceptual_duplicate"  # pHash within near_dedup.max_hamming of a kept image
    SEMANTIC_DUPLICATE = "semantic_duplicate"  # copy-detection embedding above near_dedup.threshold
    DUPLICATE_OF_REFERENCE = "duplicate_of_reference"  # a near-copy of an image of a reference set (detail names it)
    # diversity sampling
    NOT_SAMPLED = "not_sampled"  # a valid image the balanced sample did not choose (a later run may)


# Columns every row carries from ingest on.
ID = "id"  # stable: a hash of the source location (see stages.ingest.make_id)
URI = "uri"  # where the bytes came from (file path, s3://..., shard.tar#member)
BYTES = "image_bytes"  # dropped before anything is written

# Reject columns (null on rows that are still alive).
REJECT_FIELDS = [
    pa.field("stage", pa.string()),
    pa.field("reason", pa.string()),
    pa.field("detail", pa.string()),
]

# Columns validate adds.
VALIDATE_FIELDS = [
    pa.field("n_bytes", pa.int64()),
    pa.field("sha256", pa.string()),
    pa.field("format", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("mode", pa.string()),  # mode before normalization to RGB
    pa.field("n_frames", pa.int32()),
    pa.field("exif_orientation", pa.int8()),
    pa.field("phash", pa.uint64()),  # 64-bit DCT perceptual hash of the normalized image
    pa.field("decode_ms", pa.float32()),
    # technical quality of the decoded image (stages.kernels.quality)
    pa.field("q_blur", pa.float32()),  # variance of the Laplacian, gray at short side 256
    pa.field("q_dark_clip", pa.float32()),  # fraction of pixels <= 4
    pa.field("q_bright_clip", pa.float32()),  # fraction of pixels >= 251
    pa.field("q_contrast", pa.float32()),  # RMS contrast (std / 255)
    pa.field("q_entropy", pa.float32()),  # gray histogram entropy, bits (0-8)
    pa.field("q_border", pa.float32()),  # fraction of the area in flat edge bars
]

# The narrow table of an empty input (no block to take a schema from).
EMPTY_NARROW = pa.schema([pa.field(ID, pa.string()), pa.field(URI, pa.string()), *VALIDATE_FIELDS, *REJECT_FIELDS,
                          pa.field("duplicate_of", pa.string())])


def check_columns(names: list[str], required: dict[str, str]) -> None:
    """Raise ``ValueError`` naming the config key of each required column not in ``names``.

    ``required`` maps a column name to the config key that named it.
    """
    for column, key in required.items():
        if column not in names:
            raise ValueError(f"{key}: column {column!r} not in the input's columns {names}")
