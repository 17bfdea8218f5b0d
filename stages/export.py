"""Training-ready export, per shard (no Ray): re-encode each curated image and write a
webdataset ``.tar`` shard -- ``<key>.<ext>`` and ``<key>.json`` per image, the layout
Birder's webdataset loader and open_clip's training read -- plus the attribution rows.
``pipeline.export`` runs it over the curated manifest on Ray Data.
"""

from __future__ import annotations

import io
import json
import math
from typing import Any

import numpy as np
from PIL import Image, ImageOps

FORMATS = {"webp": ("webp", "WEBP"), "jpeg": ("jpg", "JPEG"), "png": ("png", "PNG")}

# Columns that say who holds the rights to an image and where it came from (the first
# one present of each kind goes to the attribution file).
LICENCE_COLUMNS = ("license", "licence", "License", "license_name")
HOLDER_COLUMNS = ("rights_holder", "rightsHolder", "owner", "creator", "author", "photographer", "publisher")
SOURCE_COLUMNS = ("source_url", "url", "identifier", "source", "page_url")
TITLE_COLUMNS = ("title", "scientific_name", "species")


def reencode(data: bytes, fmt: str, max_pixels: int | None, quality: int) -> tuple[bytes, str, int, int]:
    """(bytes, extension, width, height). ``fmt`` 'original' keeps the bytes (the
    extension from the content); else the image, EXIF orientation applied, RGB, shrunk to
    at most ``max_pixels`` (aspect kept), encoded as WebP / JPEG / PNG at ``quality``."""
    with Image.open(io.BytesIO(data)) as im:
        if fmt == "original":
            ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "TIFF": "tif"}.get(im.format or "", "img")
            w, h = im.size
            return data, ext, w, h
        if max_pixels and im.width * im.height > max_pixels:
            s = math.sqrt(max_pixels / (im.width * im.height))
            im.draft("RGB", (max(1, int(im.width * s)), max(1, int(im.height * s))))
        im = ImageOps.exif_transpose(im).convert("RGB")
    if max_pixels and im.width * im.height > max_pixels:
        s = math.sqrt(max_pixels / (im.width * im.height))
        size = (max(1, int(im.width * s)), max(1, int(im.height * s)))
        while size[0] * size[1] > max_pixels:  # rounding
            size = (size[0] - 1, size[1]) if size[0] >= size[1] else (size[0], size[1] - 1)
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
    return {"id": row["id"], "uri": row["uri"],
            **{kind: (None if col is None or row.get(col) is None else str(row[col])) for kind, col in columns.items()}}


def write_shard(fileobj, rows: list[dict], blobs: list[bytes | None], fmt: str, max_pixels: int | None,
                quality: int) -> list[dict]:
    """Write one webdataset shard to ``fileobj``; returns one record per row (key, bytes
    written, or why it was skipped: its bytes could no longer be read or decoded)."""
    import webdataset as wds

    out = []
    with wds.TarWriter(fileobj) as sink:
        for row, data in zip(rows, blobs):
            key = row["id"]
            if not data:
                out.append({"id": key, "written": False, "why": "source bytes could not be read"})
                continue
            try:
                img, ext, w, h = reencode(data, fmt, max_pixels, quality)
            except Exception as e:  # noqa: BLE001 - reported, never a crash
                out.append({"id": key, "written": False, "why": f"{type(e).__name__}: {e}"[:200]})
                continue
            sink.write({"__key__": key, ext: img, "json": sidecar(row, w, h, fmt)})
            out.append({"id": key, "written": True, "why": None, "bytes": len(img)})
    return out
