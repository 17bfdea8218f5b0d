"""Small thumbnails of a few corpus images, for pages people look at (examples report, run
report): the image bytes found again from a row's ``uri`` whatever the source kind, made
into self-contained ``data:`` URIs (no network needed to view the page).

``uri`` forms (see ``stages.ingest``): a file or object; ``shard.tar#member`` (webdataset);
``file.parquet#<key column>=<value>`` (parquet with bytes).

These pages run in the driver, so no source file is trusted: a row rejected because its
bytes are unsafe (:data:`UNSAFE`: bombs, timeouts, oversized, corrupt or unreadable files)
is never fetched and shows a placeholder with its reason; any other is read up to the
run's ``validate.max_bytes`` and decoded by ``stages.validate.validate_image`` under the
run's limits (pixels from the header before any decode, time), the geometric ones
(``min_side``, aspect) relaxed: a too-small image is worth seeing.
"""

from __future__ import annotations

import base64
import io
from collections import defaultdict

from PIL import Image
from pydantic import ValidationError

from manifests.schema import Reason
from manifests.config import StorageConfig, ValidateConfig
from stages import ingest, shards
from stages.ids import unsupported_uri
from stages.parquet_cells import read_parquet_members
from stages.validate import validate_image

# Reject reasons that say the bytes themselves are unsafe or unreadable: never fetched again.
UNSAFE = frozenset(r.value for r in (
    Reason.DECOMPRESSION_BOMB, Reason.DECODE_TIMEOUT, Reason.FILE_TOO_LARGE, Reason.CORRUPT, Reason.UNKNOWN_FORMAT,
    Reason.UNSAFE_PATH, Reason.UNSUPPORTED_URI, Reason.READ_ERROR, Reason.MISSING, Reason.EMPTY,
    Reason.PERMISSION_DENIED))


def limits_of(config: dict | None) -> ValidateConfig:
    """The ``validate`` limits a run recorded (``summary.json`` ``config``); the defaults
    for a field it lacks, or for a section this version cannot read."""
    raw = (config or {}).get("validate") or {}
    try:
        return ValidateConfig(**{k: v for k, v in raw.items() if k in ValidateConfig.model_fields})
    except ValidationError:
        return ValidateConfig()


def view_limits(limits: ValidateConfig, size: int) -> ValidateConfig:
    """``limits`` for looking at an image (a thumbnail of long side ``size``): bytes,
    pixels, formats and time kept; no minimum side or aspect."""
    return limits.model_copy(update={"min_side": 1, "min_aspect": 1e-6, "max_aspect": 1e6,
                                     "decode_short_side": max(8, size)})


def _container(uri: str) -> tuple[str, str, str] | None:
    """('tar'|'parquet', container uri, member) for a uri inside a shard or table."""
    if "#" not in uri:
        return None
    base, member = uri.split("#", 1)
    if base.lower().endswith(ingest.TAR_SUFFIXES):
        return "tar", base, member
    if base.lower().endswith(".parquet") and ("=" in member or member.startswith("@")):
        return "parquet", base, member
    return None


def fetch_many(uris: list[str], storage: StorageConfig, bytes_column: str = "image",
               max_bytes: int | None = None) -> dict[str, bytes | None]:
    """uri -> encoded bytes (None when it cannot be read, or is over ``max_bytes``: a tar
    member larger than that is not read). Members of one shard or table are read in one
    pass over it."""
    out: dict[str, bytes | None] = {}
    grouped: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)
    for u in uris:
        c = _container(u)
        if c is None:
            got = ingest.fetch_object(u, storage, max_bytes)  # at most max_bytes + 1 read
            out[u] = got if isinstance(got, bytes) else None
        else:
            grouped[(c[0], c[1])].append((c[2], u))
    for (kind, base), members in grouped.items():
        wanted = dict(members)
        for u in wanted.values():
            out[u] = None
        if unsupported_uri(base, storage.allowed_protocols):
            continue
        try:
            if kind == "tar":
                # members found again by the names their rows' uris hold (stages.shards.member_ref:
                # non-UTF-8 bytes as \xNN, '#n' for a repeated name), reads bounded as in ingest
                for ref, data in shards.read_members(base, storage, set(wanted), max_bytes).items():
                    out[wanted[ref]] = data
            else:  # the key column, then only the row groups holding wanted rows
                for ref, data in read_parquet_members(base, storage, set(wanted), bytes_column, max_bytes).items():
                    out[wanted[ref]] = data
        except Exception:  # noqa: BLE001 - a thumbnail that cannot be read is shown as missing
            continue
    return out


def thumbnail(data: bytes | None, limits: ValidateConfig, size: int = 160,
              quality: int = 80) -> tuple[str | None, str | None]:
    """(JPEG thumbnail of long side ``size`` as a data: URI, None) or (None, why not): the
    image is decoded by validate under :func:`view_limits` of ``limits``."""
    if not data:
        return None, "not readable"
    info = validate_image(data, view_limits(limits, size))
    if info.reason is not None:
        return None, f"not decoded: {info.reason.value}"
    im = Image.fromarray(info.image)
    im.thumbnail((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode(), None


def data_uri(data: bytes | None, size: int = 160, quality: int = 80,
             limits: ValidateConfig | None = None) -> str | None:
    """A JPEG thumbnail (long side ``size``, EXIF orientation applied) as a data: URI; None
    when the bytes are missing or past ``limits`` (default: validate's defaults)."""
    return thumbnail(data, limits or ValidateConfig(), size, quality)[0]


def reasons_by_uri(rows: list[dict]) -> dict[str, str | None]:
    """uri -> reject reason (None: kept) of rows with a ``uri`` and maybe a ``reason``; a
    uri also seen with an :data:`UNSAFE` reason keeps that one (it is never read)."""
    out: dict[str, str | None] = {}
    for r in rows:
        if r.get("uri") and out.get(r["uri"]) not in UNSAFE:
            out[r["uri"]] = r.get("reason")
    return out


def thumbnails(wanted: dict[str, str | None], storage: StorageConfig, limits: ValidateConfig, size: int = 160,
               quality: int = 80, bytes_column: str = "image") -> dict[str, tuple[str | None, str | None]]:
    """uri -> :func:`thumbnail` for ``wanted`` (uri -> its reject reason, None if kept). A
    uri whose reason is in :data:`UNSAFE` is not read: (None, 'not shown: <reason>')."""
    out: dict[str, tuple[str | None, str | None]] = {
        u: (None, f"not shown: {r}") for u, r in wanted.items() if r in UNSAFE}
    safe = sorted(u for u in wanted if u not in out)
    blobs = fetch_many(safe, storage, bytes_column, limits.max_bytes)
    for u in safe:
        out[u] = thumbnail(blobs.get(u), limits, size, quality)
    return out
