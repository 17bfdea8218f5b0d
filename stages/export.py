"""Training-ready export, per shard (no Ray): re-encode each curated image and write a
webdataset ``.tar`` shard -- ``<key>.<ext>`` and ``<key>.json`` per image, the layout
Birder's webdataset loader and open_clip's training read -- plus the attribution rows.
``pipeline.export`` runs it over the curated manifest on Ray Data.

Source bytes are fetched again, so they are checked before anything is written: their
sha256 must be the manifest's (else the image is skipped: the source changed since the
run), and they are decoded by ``stages.validate.validate_image`` under the run's own
``validate`` limits (bytes, pixels read from the header before any decode, time).
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
from typing import Any

import numpy as np
from PIL import Image

from manifests.config import ValidateConfig
from stages.validate import ImageInfo, validate_image

FORMATS = {"webp": ("webp", "WEBP"), "jpeg": ("jpg", "JPEG"), "png": ("png", "PNG")}
ORIGINAL_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif", "BMP": "bmp"}
SHA_MISMATCH = "source changed since the run (sha256 mismatch)"
FULL_RESOLUTION = 1 << 30  # a ``cover`` no image reaches: validate decodes at full scale

# Columns that say who holds the rights to an image and where it came from (the first
# one present of each kind goes to the attribution file).
LICENCE_COLUMNS = ("license", "licence", "License", "license_name")
HOLDER_COLUMNS = ("rights_holder", "rightsHolder", "owner", "creator", "author", "photographer", "publisher")
SOURCE_COLUMNS = ("source_url", "url", "identifier", "source", "page_url")
TITLE_COLUMNS = ("title", "scientific_name", "species")

# A spreadsheet (Excel, LibreOffice, Google Sheets) runs a cell starting with one of these
# as a formula (OWASP "CSV injection"); a plain number such as -0.25 is safe as it is.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def spreadsheet_safe(value: Any) -> Any:
    """``value`` for a CSV cell that a spreadsheet will not run: a string starting with
    ``= + - @``, a tab or a carriage return gets a leading ``'`` (shown as text), unless it
    is a plain number. Other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


class Skipped(Exception):
    """An image the export does not write; the message says why (listed in export.json)."""


def checked_decode(data: bytes | None, sha256: str | None, limits: ValidateConfig, cover: int = 0) -> ImageInfo:
    """Validate's view of source bytes fetched again, or :class:`Skipped`: unreadable, not
    the bytes the run curated (sha256), or past the run's validate limits."""
    if not data:
        raise Skipped("source bytes could not be read")
    if sha256 is None or hashlib.sha256(data).hexdigest() != sha256:
        raise Skipped(SHA_MISMATCH)
    info = validate_image(data, limits, cover)
    if info.reason is not None:
        raise Skipped(f"{info.reason.value}: {info.detail}")
    return info


def fit_pixels(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) scaled down, aspect kept, to at most ``max_pixels`` (never up)."""
    if not max_pixels or width * height <= max_pixels:
        return width, height
    s = math.sqrt(max_pixels / (width * height))
    size = (max(1, int(width * s)), max(1, int(height * s)))
    while size[0] * size[1] > max_pixels:  # rounding
        size = (size[0] - 1, size[1]) if size[0] >= size[1] else (size[0], size[1] - 1)
    return size


def reencode(data: bytes | None, sha256: str | None, fmt: str, max_pixels: int | None, quality: int,
             limits: ValidateConfig) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height) of one checked image (see :func:`checked_decode`).
    ``fmt`` 'original' keeps the bytes (the extension from the content); else validate's
    decode (EXIF orientation applied, RGB, transparency over white), shrunk to at most
    ``max_pixels`` (aspect kept), encoded as WebP / JPEG / PNG at ``quality``. One decode,
    covering the export size: JPEGs are decoded at the smallest DCT scale that covers it."""
    if fmt == "original":
        info = checked_decode(data, sha256, limits)
        return data, ORIGINAL_EXT.get(info.format or "", "img"), info.width, info.height
    cover = math.isqrt(max_pixels) + 1 if max_pixels else FULL_RESOLUTION
    im = Image.fromarray(checked_decode(data, sha256, limits, cover).decoded)
    size = fit_pixels(im.width, im.height, max_pixels)
    if size != im.size:
        im = im.resize(size, Image.Resampling.LANCZOS)
    ext, pil = FORMATS[fmt]
    buf = io.BytesIO()
    kw: dict[str, Any] = {"quality": quality} if pil in ("WEBP", "JPEG") else {}
    im.save(buf, pil, **kw)
    return buf.getvalue(), ext, im.width, im.height


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, bytes):
        return value.hex()
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


def sidecar(row: dict, width: int, height: int, fmt: str) -> bytes:
    """The ``.json`` next to an image: every manifest column (metadata, scores, cluster
    ids) and what was written."""
    meta = {k: jsonable(v) for k, v in row.items() if not k.startswith("_")}
    meta["export"] = {"width": width, "height": height, "format": fmt}
    return json.dumps(meta, sort_keys=True).encode()


def first_column(names: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def attribution_row(row: dict, columns: dict[str, str | None]) -> dict:
    """One ATTRIBUTION.csv row, every cell safe to open in a spreadsheet."""
    raw = {"id": row["id"], "uri": row["uri"],
           **{kind: (None if col is None or row.get(col) is None else str(row[col])) for kind, col in columns.items()}}
    return {k: spreadsheet_safe(v) for k, v in raw.items()}


def write_shard(fileobj, rows: list[dict], blobs: list[bytes | None], fmt: str, max_pixels: int | None,
                quality: int, limits: ValidateConfig) -> list[dict]:
    """Write one webdataset shard to ``fileobj``; returns one record per row (key, bytes
    written, or why it was skipped: its bytes could no longer be read, changed since the
    run, or are past the run's validate ``limits``)."""
    import webdataset as wds

    out = []
    with wds.TarWriter(fileobj) as sink:
        for row, data in zip(rows, blobs):
            key = row["id"]
            try:
                img, ext, w, h = reencode(data, row.get("sha256"), fmt, max_pixels, quality, limits)
            except Skipped as e:
                out.append({"id": key, "written": False, "why": str(e)[:500]})
                continue
            except Exception as e:  # noqa: BLE001 - an encoder failure is reported, never a crash
                out.append({"id": key, "written": False, "why": f"{type(e).__name__}: {e}"[:500]})
                continue
            sink.write({"__key__": key, ext: img, "json": sidecar(row, w, h, fmt)})
            out.append({"id": key, "written": True, "why": None, "bytes": len(img)})
    return out
