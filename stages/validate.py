"""Validate: decode every image once, reject the broken and the out-of-bounds, normalize.

Per image (``validate_image``): byte size, format sniffed from the content (never the
extension), header checks before any pixel is decoded (decompression bombs, minimum side,
aspect ratio), a full decode of the first frame under a time limit, EXIF orientation,
mode normalization (CMYK, P, LA, RGBA, I;16, ... -> RGB over white), content sha256, a
64-bit perceptual hash and the technical quality scores (``stages.kernels.quality``).

JPEGs are decoded with Pillow's draft mode (libjpeg DCT scaling): the decoder still reads
and entropy-decodes the whole stream, so truncated or corrupt files are still caught, but
it reconstructs pixels only at the smallest power-of-two scale whose short side covers
``decode_short_side``. This is the image later stages (embedding, quality) see. Other
formats are reduced by an integer factor (box average) right after decoding, before any
mode conversion, so a row holds only what validate and the models need.

Time limit: ``stages.deadline`` stops Python steps; a decode that may spend long in one C
call -- a JPEG with many scans (rejected above ``max_jpeg_scans`` before decoding), any
decode estimated over ``isolate_over_s``, every TIFF -- runs in a child process
(``stages.decode_pool``) that is killed at ``timeout_s``.
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

from manifests.config import ValidateConfig
from manifests.rejects import alive, reject_rows
from manifests.schema import BYTES, VALIDATE_FIELDS, Reason, Stage
from stages import decode_pool, webp
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
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)  # a WebP OpenCV refuses goes to Pillow, which says why


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


_HIGH_GRAY = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_BAND_PIXELS = 1 << 20  # source pixels converted at a time: bounds the temporaries of a conversion
_DIV257 = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)  # rint(v / 257), exactly


def gray_to_uint8(a: np.ndarray, mode: str, extrema: tuple[float, float]) -> np.ndarray:
    """8-bit gray from 16/32-bit or float gray, never through float64: 8-bit data stored
    as I/F is kept; 0..65535 is divided by 257 with rounding (integer arithmetic, exactly
    ``rint(a / 257)``); anything else is stretched over 0..255 (float32). ``extrema``: the
    whole image's (min, max), so bands of one image convert alike."""
    lo, hi = min(float(extrema[0]), 0.0), max(float(extrema[1]), 0.0)
    if lo >= 0 and hi <= 255 and mode in ("I", "F"):
        return np.rint(a).astype(np.uint8) if a.dtype.kind == "f" else a.astype(np.uint8)
    if lo >= 0 and hi <= 65535:
        if a.dtype.kind == "f":
            return np.rint(a / np.float32(257)).astype(np.uint8)
        return _DIV257[a.astype(np.uint16, copy=False)]  # a table look-up: no temporary wider than the output
    scaled = (a.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / max(hi - lo, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _high_gray_to_rgb(img: Image.Image, extrema: tuple[float, float] | None) -> Image.Image:
    extrema = extrema or img.getextrema()
    w, h = img.size
    rows = max(1, _BAND_PIXELS // max(w, 1))
    out = np.empty((h, w), dtype=np.uint8)
    for y in range(0, h, rows):  # bands: the temporaries stay a few MB whatever the size
        band = img.crop((0, y, w, min(h, y + rows)))
        out[y:y + band.height] = gray_to_uint8(np.asarray(band), img.mode, extrema)
    return Image.fromarray(out, "L").convert("RGB")


def to_rgb(img: Image.Image, extrema: tuple[float, float] | None = None) -> Image.Image:
    """Normalize any Pillow mode to 8-bit RGB; transparency is composited over white.
    ``extrema``: the (min, max) of the whole image when ``img`` is a band of it (16/32-bit
    gray scales by the whole image's range)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_GRAY:
        return _high_gray_to_rgb(img, extrema)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info)
    if has_alpha:
        rgba = img.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if mode == "1":
        img = img.convert("L")
    return img.convert("RGB")


def _factor(w: int, h: int, short: int) -> int:
    """The largest integer reduction keeping the short side >= ``short`` (at least 1)."""
    return max(1, min(w, h) // short) if short > 0 else 1


def _reduce_bands(size: tuple[int, int], band, f: int, extrema: tuple[float, float] | None = None) -> Image.Image:
    """RGB image of ``size`` reduced ``f`` times, built from ``band(y0, y1)`` (rows as a
    Pillow image of any mode), each band converted (:func:`to_rgb`) and reduced before the
    next: no full-size conversion is ever held."""
    w, h = size
    rows = max(1, _BAND_PIXELS // (w * f)) * f  # a multiple of f: no box straddles two bands
    out = Image.new("RGB", (-(-w // f), -(-h // f)))
    for y in range(0, h, rows):
        part = to_rgb(band(y, min(h, y + rows)), extrema)
        out.paste(part.reduce(f) if f > 1 else part, (0, y // f))
    return out


def reduce_image(img: Image.Image, short: int) -> Image.Image:
    """A decoded image as RGB, reduced by the largest integer factor that keeps its short
    side >= ``short`` (box average, Pillow's ``reduce``). RGB and L are reduced as they
    are; other modes are converted band by band (compositing over white commutes with
    the box average)."""
    w, h = img.size
    f = _factor(w, h, short)
    if f < 2:
        return to_rgb(img)
    if img.mode in ("RGB", "L"):
        return to_rgb(img.reduce(f))
    extrema = img.getextrema() if img.mode in _HIGH_GRAY else None
    return _reduce_bands(img.size, lambda y0, y1: img.crop((0, y0, w, y1)), f, extrema)


def decode_webp_reduced(data: bytes, short: int) -> np.ndarray | None:
    """A WebP's first frame reduced by :func:`_factor`: a still one decoded by libwebp
    straight to that size (``stages.webp``; lossless ~4 bytes/px, libwebp's ARGB plane),
    an animated one (or any without that libwebp) through OpenCV. None when libwebp
    refuses it: Pillow's decode then says why."""
    head = webp.features(data)
    if head is None or head[3]:
        return _decode_webp_opencv(data, short)
    w, h = head[:2]
    f = _factor(w, h, short)  # whole f x f boxes: the last partial row/column is dropped
    a = webp.decode_scaled(data, (w // f, h // f), (w // f * f, h // f * f))
    if a is None or a.shape[2] == 3:
        return a
    return np.asarray(to_rgb(Image.fromarray(a, "RGBA")))


def _decode_webp_opencv(data: bytes, short: int) -> np.ndarray | None:
    """A WebP's first frame through OpenCV's libwebp binding, reduced as
    :func:`reduce_image` does (the same pixels as Pillow's decode, measured on lossy,
    lossless, alpha and animated files). It peaks at ~7 bytes per pixel (libwebp's RGBA
    canvas and the BGR(A) array), Pillow's animation decoder at ~15 (two canvases, a copy,
    the image). None when OpenCV cannot decode it."""
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if a is None or a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        return None
    code = cv2.COLOR_BGRA2RGBA if a.shape[2] == 4 else cv2.COLOR_BGR2RGB
    h, w = a.shape[:2]
    band = lambda y0, y1: Image.fromarray(cv2.cvtColor(a[y0:y1], code))  # noqa: E731
    return np.asarray(_reduce_bands((w, h), band, _factor(w, h, short)))


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


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION_TAG, 1) or 1)
    except Exception:  # a broken EXIF block is not a broken image
        return 1


def _pixels(data: bytes, img: Image.Image, cfg: ValidateConfig, target: int) -> tuple[np.ndarray, int]:
    """(RGB decode whose short side covers ``target``, EXIF orientation). JPEG: DCT-scaled
    (simplejpeg, else Pillow draft); other formats: decoded, then reduced at once by an
    integer factor (:func:`reduce_image`) and the full-size decode released."""
    rgb = decode_jpeg_scaled(data, img, target) if cfg.draft else None
    if rgb is not None:
        return rgb, _orientation(img)
    if img.format in ("JPEG", "MPO"):
        w, h = img.size
        scale = target / min(w, h)
        if cfg.draft and scale < 1:
            # draft picks the largest DCT reduction that keeps both sides >= requested.
            img.draft(img.mode, (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
        img.load()  # raises on truncated / corrupt data
        return np.asarray(to_rgb(img)), _orientation(img)
    # Twice the target: the resizes after it (validate's area average, the models'
    # antialiased bicubic) then still reduce >= 2x, and give what they gave from the full decode.
    small = decode_webp_reduced(data, 2 * target) if img.format == "WEBP" else None
    if small is None:
        img.load()
        small = np.asarray(reduce_image(img, 2 * target))
    orientation = _orientation(img)
    img.close()  # frees the full-size decode now, not when the row is done
    return small, orientation


def _decode(data: bytes, img: Image.Image, cfg: ValidateConfig,
            cover: int = 0) -> tuple[np.ndarray, int, np.ndarray | None]:
    """Full decode of the first frame at reduced scale; RGB, short side reduced to
    ``decode_short_side``, then EXIF orientation applied (on the small image: cheaper,
    same result). With ``cover`` (the largest model input), the decode covers the larger of
    the two and is also returned, oriented, for the models: one decode for all."""
    rgb, orientation = _pixels(data, img, cfg, max(cfg.decode_short_side, cover))
    full = rgb if cover else None  # the models resize from the decode itself, never from a resize
    rgb = resize_short_side(rgb, cfg.decode_short_side)
    if orientation in _TRANSPOSE:
        rgb = np.ascontiguousarray(_TRANSPOSE[orientation](rgb))
        if full is not None:
            full = np.ascontiguousarray(_TRANSPOSE[orientation](full))
    return rgb, orientation, full


# ------------------------------------------------------------------ time limit in native code

# Decode cost per pixel, measured (Pillow 13 load, or simplejpeg's DCT-scaled decode, of a
# 4096x4096 photo with grain, one core of a loaded 2-core machine): PNG 29-42 ns, WebP 54
# lossy and 155 lossless, GIF 11, BMP 6; JPEG 2.3 baseline and 11.5 progressive (10 scans):
# ~1.5 + 1.0 per scan.
_NS_PER_PX = {"PNG": 45.0, "WEBP": 150.0, "GIF": 11.0, "BMP": 6.5, "TIFF": float("inf")}
_OTHER_NS_PER_PX = 110.0  # a format not measured: twice the slowest measured
_JPEG_NS_PER_PX, _JPEG_NS_PER_PX_SCAN = 1.5, 1.0
_SOS = b"\xff\xda"
_STANDALONE = {0x01, *range(0xD0, 0xD9)}  # markers without a length: TEM, RSTn, SOI
_SOF = {*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC}  # start of frame (not DHT, JPG, DAC)


def jpeg_scans(data: bytes) -> int:
    """Number of scans (SOS markers) libjpeg would decode in a JPEG, from its bytes. The
    segments before the first scan are walked by their lengths (an EXIF thumbnail in APP1
    is not counted). A sequential JPEG whose first scan holds every component is one scan
    (libjpeg stops at a second one: "Didn't expect more than one scan") -- the fast path
    needs no more; otherwise SOS markers are counted from there on (0xFFDA is always a
    marker there: entropy-coded data stuffs every 0xFF)."""
    pos, n, sof, n_comps = 2, len(data), None, 0
    while pos + 4 <= n and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xDA:
            if sof in (0xC0, 0xC1) and pos + 4 < n and data[pos + 4] == n_comps:
                return 1
            break
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in _SOF and pos + 9 < n:
            sof, n_comps = marker, data[pos + 9]
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return data.count(_SOS, pos)


def check_scans(data: bytes, img: Image.Image, cfg: ValidateConfig) -> int:
    """The scan count of a JPEG (1 for other formats); more than ``max_jpeg_scans`` is a
    ``decompression_bomb``: like a header declaring too many pixels, a small file whose
    decode work (pixels x scans) is out of all proportion to its size."""
    if img.format not in ("JPEG", "MPO"):
        return 1
    scans = jpeg_scans(data)
    if scans > cfg.max_jpeg_scans:
        kind = "progressive JPEG" if img.info.get("progressive") or img.info.get("progression") else "JPEG"
        raise Rejected(Reason.DECOMPRESSION_BOMB,
                       f"{kind} with {scans} scans > validate.max_jpeg_scans {cfg.max_jpeg_scans}")
    return scans


def estimate_decode_s(img: Image.Image, scans: int) -> float:
    """Seconds a decode of ``img`` should take, from its header; inf for TIFF (libtiff
    decodes whole strips in one call, through codecs no header check bounds, JPEG-in-TIFF
    scans included), so every TIFF is decoded in the child."""
    w, h = img.size
    if img.format in ("JPEG", "MPO"):
        ns = _JPEG_NS_PER_PX + _JPEG_NS_PER_PX_SCAN * scans
    else:
        ns = _NS_PER_PX.get(img.format or "", _OTHER_NS_PER_PX)
    return w * h * ns * 1e-9


def isolated(estimate_s: float, cfg: ValidateConfig) -> bool:
    """Whether a decode goes to the child process: estimated over ``isolate_over_s`` (or
    over half of ``timeout_s``, so an in-process decode ends well within the limit)."""
    limit = cfg.isolate_over_s
    if cfg.timeout_s > 0:
        limit = min(limit, cfg.timeout_s / 2)
    return estimate_s > limit


# A decode past its limit is a timeout only when this thread spent at least this share of
# the limit on CPU: a decoder that is working uses the CPU it is given, a thread that was
# not scheduled (an overloaded node, a stopped process, a long GC in another thread holding
# the GIL) did not, and its image gets a second try in the decode child.
STALL_CPU_SHARE = 0.25


def stalled(cpu_s: float, cfg: ValidateConfig) -> bool:
    """Whether a decode that ran past ``timeout_s`` having used ``cpu_s`` of this thread's
    CPU time was stalled rather than slow (see ``STALL_CPU_SHARE``)."""
    return cpu_s < STALL_CPU_SHARE * cfg.timeout_s


def _open_for_decode(data: bytes, cfg: ValidateConfig, info: ImageInfo) -> tuple[Image.Image, int, int, bool]:
    """Open and check the header; the stored size (before ``draft()`` reduces it) and
    whether the decode goes to the child process."""
    img = _open_checked(data, cfg)
    info.format, info.mode = img.format, img.mode
    info.n_frames = int(getattr(img, "n_frames", 1) or 1)
    w, h = img.size
    return img, w, h, isolated(estimate_decode_s(img, check_scans(data, img, cfg)), cfg)


def decode_in_child(data: bytes, params: dict) -> tuple[dict, list[np.ndarray | None]]:
    """The child's side (``stages.decode_pool``): open, check and decode as in process."""
    cfg = ValidateConfig.model_validate(params["cfg"])
    rgb, orientation, full = _decode(data, _open_checked(data, cfg), cfg, params["cover"])
    return {"orientation": orientation}, [rgb, full]


def _decode_isolated(data: bytes, cfg: ValidateConfig, cover: int, timeout: float | None,
                     child: decode_pool.DecodeProcess) -> tuple[np.ndarray, int, np.ndarray | None]:
    """:func:`_decode` in this process's decode ``child``, killed after ``timeout`` seconds
    (not counting the start of a child)."""
    try:
        meta, (rgb, full) = child.run(data, {"cfg": cfg.model_dump(mode="json"), "cover": cover}, timeout)
    except decode_pool.DecodeTimeout:
        raise Rejected(Reason.DECODE_TIMEOUT, f"decode took longer than timeout_s {cfg.timeout_s} "
                                              "(decode process killed)") from None
    except decode_pool.DecodeRejected as r:
        raise Rejected(Reason(r.reason), r.detail) from None
    except (decode_pool.DecodeCrashed, decode_pool.DecodeFailed) as e:
        raise Rejected(Reason.CORRUPT, str(e)[:500]) from None
    return rgb, int(meta["orientation"]), full


def validate_image(data: bytes | None, cfg: ValidateConfig, cover: int = 0) -> ImageInfo:
    """Validate one encoded image. Never raises on bad input: failures are a ``reason``.
    With ``cover`` > 0, ``info.decoded`` is the oriented decode whose short side covers it
    (the embedding stage's input)."""
    if data is None:
        return ImageInfo(0, None, reason=Reason.EMPTY, detail="no bytes")
    info = ImageInfo(n_bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    t0, cpu0 = time.perf_counter(), time.thread_time()
    try:
        if not data:
            raise Rejected(Reason.EMPTY, "zero-byte file")
        if len(data) > cfg.max_bytes:
            raise Rejected(Reason.FILE_TOO_LARGE, f"{len(data)} bytes > max_bytes {cfg.max_bytes}")
        img = None
        try:
            with deadline(cfg.timeout_s):
                img, w, h, away = _open_for_decode(data, cfg, info)
                if not away:
                    rgb, orientation, full = _decode(data, img, cfg, cover)
        except DeadlineExceeded:
            if not stalled(time.thread_time() - cpu0, cfg):
                raise  # the decode itself used the time: a timeout
            # This thread hardly ran (a loaded machine, a process paused): not the file's
            # doing. Once more, in the decode child with the whole limit.
            if img is not None:
                img.close()  # the first open's file: the retry opens its own
            t0 = time.perf_counter()
            with deadline(cfg.timeout_s):
                img, w, h, _ = _open_for_decode(data, cfg, info)
            away = True
        if away:
            img.close()
            left = cfg.timeout_s - (time.perf_counter() - t0) if cfg.timeout_s > 0 else None
            child = decode_pool.shared(f"{__name__}:decode_in_child")
            try:
                rgb, orientation, full = _decode_isolated(data, cfg, cover, left, child)
            finally:
                t0 += child.startup_s  # a child starting up is not this file's time
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
    except decode_pool.DecodeUnavailable:  # a broken environment fails the task, it is not a reject
        raise
    except Exception as e:  # any decoder failure is a reject, never a crash
        info.reason = Reason.CORRUPT
        info.detail = f"{type(e).__name__}: {e}"[:500]
    info.decode_ms = (time.perf_counter() - t0) * 1000.0
    return info


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
    live = alive(table)
    cols: dict[str, list] = {f.name: [] for f in VALIDATE_FIELDS}
    rejects: list[tuple[Reason, str] | None] = []
    decodes: list[np.ndarray | None] = []
    reused = np.zeros(len(blobs), dtype=bool)
    for i, data in enumerate(blobs):
        if not live[i]:  # rejected upstream: passed through, only its size recorded
            info = ImageInfo(n_bytes=len(data) if data is not None else None, sha256=None)
        elif reuse is not None and data and is_known(reuse, [sha := hashlib.sha256(data).hexdigest()])[0]:
            info = ImageInfo(n_bytes=len(data), sha256=sha)
            reused[i] = True
        else:
            info = validate_image(data, cfg, cover)
        decodes.append(info.decoded if live[i] and info.reason is None else None)
        for f in VALIDATE_FIELDS:
            cols[f.name].append(getattr(info, f.name))
        rejects.append((info.reason, info.detail) if live[i] and info.reason else None)
    out = table.drop_columns([BYTES])
    for f in VALIDATE_FIELDS:
        if f.name in out.column_names:
            out = out.drop_columns([f.name])
        out = out.append_column(f, pa.array(cols[f.name], type=f.type))
    out = reject_rows(out, Stage.VALIDATE, rejects)
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
    reuse: np.ndarray | None = None  # sorted sha256 keys not to decode (a refresh; the plan resolves its ref)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return validate_batch_decodes(batch, self.cfg, 0, self.reuse)[0]
