"""Validate: decode every image once, reject the broken and the out-of-bounds, normalize.

Per image (``validate_image``): byte size, format sniffed from the content (never the
extension), header checks before any pixel is decoded (decompression bombs, minimum side,
aspect ratio), a full decode of the first frame under a time limit, EXIF orientation,
mode normalization (CMYK, P, LA, RGBA, I;16, ... -> RGB over white), content sha256, a
64-bit perceptual hash and the technical quality scores (``stages.kernels.quality``).

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

import cv2
import numpy as np
import pyarrow as pa
import simplejpeg
from PIL import Image, ImageFile

from manifests.schema import BYTES, REJECT_FIELDS, VALIDATE_FIELDS, Reason, Stage
from pipeline.config import ValidateConfig
from stages.deadline import DeadlineExceeded, deadline
from stages.kernels.phash import phash64
from stages.kernels.quality import measure as measure_quality

ImageFile.LOAD_TRUNCATED_IMAGES = False
# Our own max_pixels check is the authority; Pillow still raises DecompressionBombError
# past twice its default, which we also turn into a reject.
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
# EXIF orientation -> the array operation that displays it (as PIL.ImageOps.exif_transpose).
_TRANSPOSE = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],
    8: lambda a: np.rot90(a, 1),
}
cv2.setNumThreads(1)  # one decode per task; Ray gives each task its CPU


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
    q_blur: float | None = None
    q_dark_clip: float | None = None
    q_bright_clip: float | None = None
    q_contrast: float | None = None
    q_entropy: float | None = None
    q_border: float | None = None
    reason: Reason | None = None
    detail: str | None = None
    image: np.ndarray | None = field(default=None, repr=False)  # normalized RGB, HxWx3 uint8
    decoded: np.ndarray | None = field(default=None, repr=False)  # the decode covering the models' input


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


def short_side_size(w: int, h: int, short: int) -> tuple[int, int]:
    """(width, height) with the short side ``short`` (never upscaled)."""
    s = min(w, h)
    if s <= short:
        return w, h
    scale = short / s
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_short_side(rgb: np.ndarray, short: int) -> np.ndarray:
    """Resize an HxWx3 uint8 array so its short side is ``short`` (never upscales).

    Reductions of 2x or more use area averaging (antialiased). A smaller step -- what is
    left after libjpeg's DCT scaling, which already low-passes exactly -- is bilinear: at
    under 2x every source pixel still contributes, and it costs a tenth of area averaging.
    """
    h, w = rgb.shape[:2]
    size = short_side_size(w, h, short)
    if size == (w, h):
        return rgb
    interp = cv2.INTER_AREA if min(w, h) >= 2 * short else cv2.INTER_LINEAR
    return cv2.resize(rgb, size, interpolation=interp)


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


def decode_jpeg_scaled(data: bytes, img: Image.Image, short: int) -> np.ndarray | None:
    """libjpeg-turbo through simplejpeg: DCT scaling to the smallest scale covering
    ``short``, fast IDCT and upsampling, and *strict*: any libjpeg warning (premature end
    of data, corrupt segment) raises. Returns None to fall back to Pillow, which tolerates
    harmless warnings but still catches truncation."""
    if img.format != "JPEG" or img.mode not in ("RGB", "L"):
        return None
    w, h = img.size
    s = min(w, h)
    try:
        return simplejpeg.decode_jpeg(
            data, colorspace="RGB", fastdct=True, fastupsample=True, strict=True,
            min_width=max(1, -(-w * short // s)), min_height=max(1, -(-h * short // s)),
        )
    except ValueError:
        return None


def _decode(data: bytes, img: Image.Image, cfg: ValidateConfig,
            cover: int = 0) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Full decode of the first frame at reduced scale; RGB, short side reduced to
    ``decode_short_side``, then EXIF orientation applied (on the small image: cheaper,
    same result). With ``cover`` (the largest model input), the decode covers the larger of
    the two and is also returned, oriented, for the models: one decode for all."""
    w, h = img.size
    target = max(cfg.decode_short_side, cover)
    rgb = decode_jpeg_scaled(data, img, target) if cfg.draft else None
    if rgb is None:
        if cfg.draft and img.format in ("JPEG", "MPO"):
            scale = target / min(w, h)
            if scale < 1:
                # draft picks the largest DCT reduction that keeps both sides >= requested.
                img.draft(img.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()  # raises on truncated / corrupt data
        rgb = np.asarray(to_rgb(img))
    full = rgb if cover else None  # the models resize from the decode itself, never from a resize
    rgb = resize_short_side(rgb, cfg.decode_short_side)
    orientation = 1
    try:
        orientation = int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        orientation = 1
    if orientation in _TRANSPOSE:
        rgb = np.ascontiguousarray(_TRANSPOSE[orientation](rgb))
        if full is not None:
            full = np.ascontiguousarray(_TRANSPOSE[orientation](full))
    return rgb, orientation, full


def validate_image(data: bytes | None, cfg: ValidateConfig, cover: int = 0) -> ImageInfo:
    """Validate one encoded image. Never raises on bad input: failures are a ``reason``.
    With ``cover`` > 0, ``info.decoded`` is the oriented decode whose short side covers it
    (the embedding stage's input)."""
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
            rgb, orientation, full = _decode(data, img, cfg, cover)
        info.exif_orientation = orientation
        if orientation in _SWAPS_AXES:
            w, h = h, w
        info.width, info.height = w, h
        gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        info.phash = phash64(cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA))
        for k, v in measure_quality(gray).__dict__.items():
            setattr(info, f"q_{k}", v)
        info.image = rgb
        info.decoded = full
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
    return validate_batch_decodes(table, cfg)[0]


def validate_batch_decodes(table: pa.Table, cfg: ValidateConfig, cover: int = 0,
                           reuse: np.ndarray | None = None) -> tuple[pa.Table, list[np.ndarray | None]]:
    """:func:`validate_batch`, plus each row's decode covering ``cover`` (None for
    rejected rows) for the embedding stage.

    ``reuse`` (a refresh): sorted 16-byte sha256 keys of images validated by a previous
    run. Those rows are not decoded: they get only ``n_bytes`` and ``sha256``, and a
    ``_reused`` column marks them (the plan copies the rest from the previous run)."""
    from stages.embed import is_known
    blobs = table.column(BYTES).to_pylist()
    prior_reason = table.column("reason").to_pylist()
    cols: dict[str, list] = {f.name: [] for f in _OUT_SCHEMA}
    decodes: list[np.ndarray | None] = []
    reused = np.zeros(len(blobs), dtype=bool)
    prior = {k: table.column(k).to_pylist() for k in ("stage", "reason", "detail")}
    for i, data in enumerate(blobs):
        if prior_reason[i] is not None:
            for f in VALIDATE_FIELDS:
                cols[f.name].append(len(data) if f.name == "n_bytes" and data is not None else None)
            for k in ("stage", "reason", "detail"):
                cols[k].append(prior[k][i])
            decodes.append(None)
            continue
        if reuse is not None and data and is_known(reuse, [sha := hashlib.sha256(data).hexdigest()])[0]:
            info = ImageInfo(n_bytes=len(data), sha256=sha)
            reused[i] = True
        else:
            info = validate_image(data, cfg, cover)
        decodes.append(info.decoded if info.reason is None else None)
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
    if reuse is not None:
        out = out.append_column("_reused", pa.array(reused, pa.bool_()))
    return out, decodes


@dataclass
class ValidateStage:
    """Ray-free per-batch stage. Columns in: id, uri, image_bytes, stage/reason/detail.
    Columns out: the same minus image_bytes, plus ``manifests.schema.VALIDATE_FIELDS``.
    Resources: 1 CPU per task, no setup."""

    cfg: ValidateConfig
    name: str = Stage.VALIDATE.value
    num_cpus: float = 1.0
    reuse: object = None  # sorted sha256 keys not to decode (a refresh), or an object ref of them

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.reuse is not None and not isinstance(self.reuse, np.ndarray):
            import ray  # an object ref from the plan: fetched once per worker

            self.reuse = ray.get(self.reuse)
        return validate_batch_decodes(batch, self.cfg, 0, self.reuse)[0]
