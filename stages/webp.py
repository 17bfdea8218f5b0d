"""Scaled WebP decoding through libwebp's advanced API (``WebPDecode`` with
``options.use_scaling``), called with ctypes on the libwebp that Pillow's wheel bundles.

libwebp then writes only the reduced image: the lossy decoder rescales each macroblock row
as it is reconstructed (a few rows of the full width in memory); the lossless decoder still
keeps its full ARGB plane (4 bytes per pixel: backward references reach any earlier pixel)
but rescales rows into the small output as they are finished. Compared with a full-size
decode and a reduction afterwards, a lossless file at ``max_pixels`` peaks at ~4 instead
of ~7 bytes per pixel and the full-size RGB array is never made.

Struct layouts: ``src/webp/decode.h`` of libwebp 1.5-1.6 (decoder ABI 0x0209/0x0210; the
structs are the same since 0x0200, and libwebp only refuses a caller whose ABI *major*
byte differs). :func:`decode_scaled` returns None when the library cannot be loaded, is
of another major ABI, the file is animated, or libwebp refuses it: the caller falls back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import os

import numpy as np

ABI_VERSION = 0x0209  # WEBP_DECODER_ABI_VERSION of libwebp 1.5 (1.6 is 0x0210: same structs)
_MODE_RGB, _MODE_RGBA = 0, 1  # WEBP_CSP_MODE
_c_int, _u32 = ctypes.c_int, ctypes.c_uint32


class _Features(ctypes.Structure):  # WebPBitstreamFeatures
    _fields_ = [("width", _c_int), ("height", _c_int), ("has_alpha", _c_int), ("has_animation", _c_int),
                ("format", _c_int), ("pad", _u32 * 5)]


class _RGBA(ctypes.Structure):  # WebPRGBABuffer
    _fields_ = [("rgba", ctypes.c_void_p), ("stride", _c_int), ("size", ctypes.c_size_t)]


class _YUVA(ctypes.Structure):  # WebPYUVABuffer (only its size matters: the union's)
    _fields_ = [("y", ctypes.c_void_p), ("u", ctypes.c_void_p), ("v", ctypes.c_void_p), ("a", ctypes.c_void_p),
                ("y_stride", _c_int), ("u_stride", _c_int), ("v_stride", _c_int), ("a_stride", _c_int),
                ("y_size", ctypes.c_size_t), ("u_size", ctypes.c_size_t), ("v_size", ctypes.c_size_t),
                ("a_size", ctypes.c_size_t)]


class _Buffers(ctypes.Union):
    _fields_ = [("RGBA", _RGBA), ("YUVA", _YUVA)]


class _DecBuffer(ctypes.Structure):  # WebPDecBuffer
    _fields_ = [("colorspace", _c_int), ("width", _c_int), ("height", _c_int), ("is_external_memory", _c_int),
                ("u", _Buffers), ("pad", _u32 * 4), ("private_memory", ctypes.c_void_p)]


class _Options(ctypes.Structure):  # WebPDecoderOptions
    _fields_ = [(name, _c_int) for name in (
        "bypass_filtering", "no_fancy_upsampling", "use_cropping", "crop_left", "crop_top", "crop_width",
        "crop_height", "use_scaling", "scaled_width", "scaled_height", "use_threads", "dithering_strength",
        "flip", "alpha_dithering_strength")] + [("pad", _u32 * 5)]


class _Config(ctypes.Structure):  # WebPDecoderConfig
    _fields_ = [("input", _Features), ("output", _DecBuffer), ("options", _Options)]


def _candidates() -> list[str]:
    """libwebp files to try: the one bundled with Pillow (Linux wheels: ``pillow.libs``,
    macOS: ``PIL/.dylibs``), then the system's."""
    try:
        import PIL
    except ImportError:  # pragma: no cover - Pillow is a dependency
        return []
    pil = os.path.dirname(PIL.__file__)
    found = sorted(glob.glob(os.path.join(os.path.dirname(pil), "pillow.libs", "libwebp-*.so*")))
    found += sorted(glob.glob(os.path.join(pil, ".dylibs", "libwebp.*dylib")))
    system = ctypes.util.find_library("webp")
    return found + ([system] if system else [])


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    """``lib`` with the decode entry points typed, or None when it lacks them or is of
    another major ABI (struct layouts would differ)."""
    try:
        version = lib.WebPGetDecoderVersion()
        lib.WebPInitDecoderConfigInternal.argtypes = [ctypes.POINTER(_Config), _c_int]
        lib.WebPGetFeaturesInternal.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Features), _c_int]
        lib.WebPDecode.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.POINTER(_Config)]
        lib.WebPFreeDecBuffer.argtypes = [ctypes.POINTER(_DecBuffer)]
        lib.WebPFreeDecBuffer.restype = None
    except AttributeError:
        return None
    if version >> 16 != 1:  # 0xMMmmpp: libwebp 1.x carries decoder ABI 2.x
        return None
    return lib


@functools.lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The bound libwebp, or None when none can be loaded (callers fall back)."""
    for path in _candidates():
        try:
            lib = _bind(ctypes.CDLL(path))
        except OSError:
            continue
        if lib is not None:
            return lib
    return None


def features(data: bytes) -> tuple[int, int, bool, bool] | None:
    """(width, height, has_alpha, has_animation) from the header, or None."""
    lib = library()
    data = data if isinstance(data, bytes) else bytes(data)
    feat = _Features()
    if lib is None or lib.WebPGetFeaturesInternal(data, len(data), ctypes.byref(feat), ABI_VERSION) != 0:
        return None
    return feat.width, feat.height, bool(feat.has_alpha), bool(feat.has_animation)


def decode_scaled(data: bytes, size: tuple[int, int], crop: tuple[int, int] | None = None) -> np.ndarray | None:
    """A still WebP decoded by libwebp straight to ``size`` (width, height) -- from its
    top-left ``crop`` (width, height) when given, e.g. whole boxes of an integer
    reduction: libwebp's rescaler then averages exact f x f boxes -- as an HxWx3 RGB
    array, or HxWx4 straight-alpha RGBA when the file has alpha (libwebp averages
    premultiplied, so compositing the result over white equals averaging the composite).
    None when libwebp is unavailable, the file is animated, or libwebp refuses it."""
    lib = library()
    data = data if isinstance(data, bytes) else bytes(data)
    head = features(data)
    if lib is None or head is None or head[3]:
        return None
    config = _Config()
    if not lib.WebPInitDecoderConfigInternal(ctypes.byref(config), ABI_VERSION):
        return None
    (w, h), full = size, head[:2]
    out = np.empty((h, w, 4 if head[2] else 3), np.uint8)
    opts, buf = config.options, config.output
    crop = tuple(crop or full)
    opts.use_cropping = int(crop != full)
    opts.crop_width, opts.crop_height = crop
    opts.use_scaling = int((w, h) != crop)
    opts.scaled_width, opts.scaled_height = w, h
    buf.colorspace = _MODE_RGBA if head[2] else _MODE_RGB
    buf.is_external_memory = 1  # libwebp writes into ``out``; nothing of its own to free
    buf.u.RGBA.rgba = out.ctypes.data
    buf.u.RGBA.stride = out.strides[0]
    buf.u.RGBA.size = out.nbytes
    status = lib.WebPDecode(data, len(data), ctypes.byref(config))
    lib.WebPFreeDecBuffer(ctypes.byref(config.output))
    return out if status == 0 else None
