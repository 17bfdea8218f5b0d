"""Validate: decode every image once, reject the broken and the out-of-bounds, normalize.

Per image (``validate_image``): byte size, format sniffed from the content (never the
extension), header checks before any pixel is decoded (decompression bombs, minimum side,
aspect ratio), a full decode of the first frame under a time limit, EXIF orientation,
mode normalization (CMYK, P, LA, RGBA, I;16, ... -> RGB over white), content sha256 and a
64-bit perceptual hash.

JPEGs are decoded with Pillow's draft mode (libjpeg DCT scaling): the decoder still reads
and entropy-decodes the whole stream, so truncated or corrupt files are still caught, but
it reconstructs pixels only at the smallest power-of-two scale whose short side covers
``decode_short_side``. This is the image later stages (embedding, quality) see.
"""

from __future__ import annotations

import hashlib
import io
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from manifests.schema import BYTES, REJECT_FIELDS, VALIDATE_FIELDS, Reason, Stage
from pipeline.config import ValidateConfig
from stages.deadline import DeadlineExceeded, deadline
from stages.kernels.phash import phash64

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own max_pixels check is the authority; Pillow still raises DecompressionBombError
# past twice its default, which we also turn into a reject.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class Rejected(Exception):
    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class ImageInfo:
    """What validation learned about one image; ``reason`` is None when it passed."""

    n_bytes: int
    sha256: str | None
    format: str | None = None
    width: int | None = None  # as displayed, after EXIF orientation
    height: int | None = None
    mode: str | None = None
    n_frames: int | None = None
    exif_orientation: int | None = None
    phash: int | None = None
    decode_ms: float | None = None
    reason: Reason | None = None
    detail: str | None = None
    image: Image.Image | None = field(default=None, repr=False)  # normalized RGB


def to_rgb(img: Image.Image) -> Image.Image:
    """Normalize any Pillow mode to 8-bit RGB; transparency is composited over white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = float(a.min(initial=0.0)), float(a.max(initial=0.0))
        if lo >= 0 and hi <= 255 and mode in ("I", "F"):
            scaled = a
        elif lo >= 0 and hi <= 65535:
            scaled = a / 257.0
        else:  # out-of-range 32-bit / float data: stretch
            scaled = (a - lo) * (255.0 / max(hi - lo, 1e-12))
        gray = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
        return gray.convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def resize_short_side(img: Image.Image, short: int) -> Image.Image:
    """Resize so the short side is ``short`` (never upscales); bilinear with antialias."""
    w, h = img.size
    s = min(w, h)
    if s <= short:
        return img
    scale = short / s
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def _open_checked(data: bytes, cfg: ValidateConfig) -> Image.Image:
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise Rejected(Reason.DECOMPRESSION_BOMB, f"Pillow refused the header: {e}") from None
    except Image.UnidentifiedImageError:
        raise Rejected(Reason.UNKNOWN_FORMAT, f"not an image Pillow can identify (starts {data[:8].hex()})") from None
    fmt = img.format or "?"
    if fmt not in cfg.allowed_formats:
        raise Rejected(Reason.FORMAT_NOT_ALLOWED, f"format {fmt} not in {sorted(cfg.allowed_formats)}")
    w, h = img.size
    if w * h > cfg.max_pixels:
        raise Rejected(Reason.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} px > max_pixels {cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise Rejected(Reason.TOO_SMALL, f"{w}x{h}: short side < min_side {cfg.min_side}")
    aspect = w / h
    if not (cfg.min_aspect <= aspect <= cfg.max_aspect):
        raise Rejected(
            Reason.BAD_ASPECT, f"{w}x{h}: aspect {aspect:.3f} outside [{cfg.min_aspect}, {cfg.max_aspect}]"
        )
    return img


def _decode(img: Image.Image, cfg: ValidateConfig) -> tuple[Image.Image, int]:
    """Full decode of the first frame, orientation and mode normalized, short side reduced."""
    w, h = img.size
    if cfg.draft and img.format in ("JPEG", "MPO"):
        scale = cfg.decode_short_side / min(w, h)
        if scale < 1:
            # draft picks the largest DCT reduction that keeps both sides >= requested.
            img.draft(img.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    img.load()  # raises on truncated / corrupt data
    orientation = 1
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    if orientation != 1:
        img = ImageOps.exif_transpose(img)
    img = to_rgb(img)
    return resize_short_side(img, cfg.decode_short_side), orientation


def validate_image(data: bytes | None, cfg: ValidateConfig) -> ImageInfo:
    """Validate one encoded image. Never raises on bad input: failures are a ``reason``."""
    if data is None:
        return ImageInfo(0, None, reason=Reason.EMPTY, detail="no bytes")
    info = ImageInfo(n_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    t0 = time.perf_counter()
    try:
        if not data:
            raise Rejected(Reason.EMPTY, "zero-byte file")
        if len(data) > cfg.max_bytes:
            raise Rejected(Reason.FILE_TOO_LARGE, f"{len(data)} bytes > max_bytes {cfg.max_bytes}")
        with deadline(cfg.timeout_s):
            img = _open_checked(data, cfg)
            info.format, info.mode = img.format, img.mode
            info.n_frames = int(getattr(img, "n_frames", 1) or 1)
            w, h = img.size  # before draft() reduces it
            rgb, orientation = _decode(img, cfg)
        info.exif_orientation = orientation
        if orientation in _SWAPS_AXES:
            w, h = h, w
        info.width, info.height = w, h
        info.phash = phash64(np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.BILINEAR)))
        info.image = rgb
    except Rejected as r:
        info.reason, info.detail = r.reason, r.detail
    except DeadlineExceeded:
        info.reason = Reason.DECODE_TIMEOUT
        info.detail = f"decode took longer than timeout_s {cfg.timeout_s}"
    except Exception as e:  # any decoder failure is a reject, never a crash
        info.reason = Reason.CORRUPT
        info.detail = f"{type(e).__name__}: {e}"[:500]
    info.decode_ms = (time.perf_counter() - t0) * 1000.0
    return info


_OUT_SCHEMA = pa.schema([*VALIDATE_FIELDS, *REJECT_FIELDS])


def validate_batch(table: pa.Table, cfg: ValidateConfig) -> pa.Table:
    """Validate every row of ``table`` (column ``image_bytes``).

    Rows already rejected upstream (``reason`` not null) pass through untouched. Returns
    the table without ``image_bytes``, with the validate columns and reject columns set.
    """
    blobs = table.column(BYTES).to_pylist()
    prior_reason = table.column("reason").to_pylist()
    cols: dict[str, list] = {f.name: [] for f in _OUT_SCHEMA}
    prior = {k: table.column(k).to_pylist() for k in ("stage", "reason", "detail")}
    for i, data in enumerate(blobs):
        if prior_reason[i] is not None:
            for f in VALIDATE_FIELDS:
                cols[f.name].append(len(data) if f.name == "n_bytes" and data is not None else None)
            for k in ("stage", "reason", "detail"):
                cols[k].append(prior[k][i])
            continue
        info = validate_image(data, cfg)
        for f in VALIDATE_FIELDS:
            cols[f.name].append(getattr(info, f.name))
        cols["stage"].append(Stage.VALIDATE.value if info.reason else None)
        cols["reason"].append(info.reason.value if info.reason else None)
        cols["detail"].append(info.detail)
    out = table.drop_columns([BYTES, "stage", "reason", "detail"])
    for f in _OUT_SCHEMA:
        if f.name in out.column_names:
            out = out.drop_columns([f.name])
        out = out.append_column(f, pa.array(cols[f.name], type=f.type))
    return out


@dataclass
class ValidateStage:
    """Ray-free per-batch stage. Columns in: id, uri, image_bytes, stage/reason/detail.
    Columns out: the same minus image_bytes, plus ``manifests.schema.VALIDATE_FIELDS``.
    Resources: 1 CPU per task, no setup."""

    cfg: ValidateConfig
    name: str = Stage.VALIDATE.value
    num_cpus: float = 1.0

    def __call__(self, batch: pa.Table) -> pa.Table:
        return validate_batch(batch, self.cfg)
