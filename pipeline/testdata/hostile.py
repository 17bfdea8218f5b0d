"""Hostile input files built on the fly for tests and bench/hostile.py (no binary fixtures).

Decode-level files (this part): progressive JPEGs with as many scans as asked (the
"scan bomb": every scan makes libjpeg visit every block of the image, so a tiny file can
take seconds), large valid images that are cheap to encode but costly to decode (PNG,
16-bit PNG, TIFF, WebP), headers declaring more pixels than allowed, truncated files.
Everything is streamed or vectorized so a near-``max_pixels`` file is built in about a
second without holding its pixels.
"""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# --------------------------------------------------------------------------- JPEG scan bombs

# Huffman tables (canonical, JPEG Annex C): DC categories 0..11, category 0 (a DC equal to
# the previous block's) on one bit; AC: only the EOB-run symbols (r << 4, r = 0..14), which
# is all a scan of zero coefficients needs.
_DC_BITS = [1, 0, 0, 0, 11] + [0] * 11
_DC_VALS = list(range(12))
_AC_BITS = [0, 0, 0, 15] + [0] * 12
_AC_VALS = [r << 4 for r in range(15)]
_MAX_EOBRUN = 32767  # the longest run one EOB14 symbol codes


def _canonical_codes(bits: list[int], vals: list[int]) -> dict[int, tuple[int, int]]:
    """symbol -> (code, length) of a JPEG Huffman table given as BITS/HUFFVAL."""
    out, code, k = {}, 0, 0
    for length, count in enumerate(bits, start=1):
        for _ in range(count):
            out[vals[k]] = (code, length)
            code, k = code + 1, k + 1
        code <<= 1
    return out


def _segment(marker: int, payload: bytes) -> bytes:
    return struct.pack(">HH", 0xFF00 | marker, len(payload) + 2) + payload


def _pack_bits(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate big-endian bit fields, pad with ones, byte-stuff 0xFF (entropy data)."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    if total == 0:
        return b""
    owner = np.repeat(np.arange(len(values)), lengths)
    pos = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    bits = (values.astype(np.int64)[owner] >> (lengths[owner] - 1 - pos)) & 1
    pad = (-total) % 8
    bits = np.concatenate([bits.astype(np.uint8), np.ones(pad, np.uint8)])
    return np.packbits(bits).tobytes().replace(b"\xff", b"\xff\x00")


def _dc_scan_data(dc: np.ndarray) -> bytes:
    """Entropy data of a DC first scan (Al = 0) of one component, blocks in raster order."""
    codes = _canonical_codes(_DC_BITS, _DC_VALS)
    diff = np.diff(dc.ravel().astype(np.int64), prepend=0)
    cat = np.zeros(diff.shape, np.int64)
    nz = diff != 0
    cat[nz] = np.floor(np.log2(np.abs(diff[nz]))).astype(np.int64) + 1
    extra = np.where(diff >= 0, diff, diff + (1 << cat) - 1)
    code = np.array([codes[c][0] for c in range(12)])[cat]
    clen = np.array([codes[c][1] for c in range(12)])[cat]
    return _pack_bits((code << cat) | extra, clen + cat)


def _eob_scan_data(n_blocks: int) -> bytes:
    """Entropy data of an AC scan (first or refinement) in which every block is zero:
    EOB runs of at most 32767 blocks each."""
    codes = _canonical_codes(_AC_BITS, _AC_VALS)
    runs = [_MAX_EOBRUN] * (n_blocks // _MAX_EOBRUN) + ([n_blocks % _MAX_EOBRUN] if n_blocks % _MAX_EOBRUN else [])
    vals, lens = [], []
    for n in runs:
        r = n.bit_length() - 1
        code, clen = codes[r << 4]
        vals.append((code << r) | (n - (1 << r)))
        lens.append(clen + r)
    return _pack_bits(np.array(vals), np.array(lens))


def _ac_scans(n: int) -> list[tuple[int, int, int]]:
    """``n`` AC scans (Ss = Se = k, Ah, Al) in a legal progression: per coefficient k, a
    first scan at Al = 13 and its refinements down to Al = 0 (14 scans), k = 1, 2, ..."""
    out = []
    for k in range(1, 64):
        out.append((k, 0, 13))
        out += [(k, al + 1, al) for al in range(12, -1, -1)]
        if len(out) >= n:
            return out[:n]
    raise ValueError(f"at most {63 * 14 + 1} scans in a one-component progressive JPEG, asked {n + 1}")


def _block_means(width: int, height: int) -> np.ndarray:
    """Per 8x8 block gray level (-128..127): a smooth diagonal pattern, so the decode is
    an image, not a flat field."""
    by, bx = np.mgrid[0 : -(-height // 8), 0 : -(-width // 8)]
    return ((((bx + 2 * by) // 4) % 160) - 80).astype(np.int64)


def progressive_jpeg(width: int, height: int, scans: int) -> bytes:
    """A valid grayscale progressive JPEG of ``width x height`` with ``scans`` scans: one DC
    scan, then ``scans - 1`` spectral-selection / successive-approximation AC scans whose
    coefficients are all zero (each an EOB run of a few bytes). 4096x4096 with 883 scans is
    about 60 KB, and every scan costs libjpeg a pass over all 262,144 blocks."""
    if scans < 1:
        raise ValueError("scans must be >= 1")
    n_blocks = -(-width // 8) * -(-height // 8)
    qt = bytes([0]) + bytes([8] + [16] * 63)  # DC step 8: a stored DC is the block mean - 128
    dht = bytes([0x00]) + bytes(_DC_BITS) + bytes(_DC_VALS) + bytes([0x10]) + bytes(_AC_BITS) + bytes(_AC_VALS)
    out = [b"\xff\xd8", _segment(0xDB, qt),
           _segment(0xC2, struct.pack(">BHHB", 8, height, width, 1) + bytes([1, 0x11, 0])),
           _segment(0xC4, dht)]
    out += [_segment(0xDA, bytes([1, 1, 0x00, 0, 0, 0])), _dc_scan_data(_block_means(width, height))]
    eob = _eob_scan_data(n_blocks)
    for k, ah, al in _ac_scans(scans - 1) if scans > 1 else []:
        out += [_segment(0xDA, bytes([1, 1, 0x00, k, k, (ah << 4) | al])), eob]
    out.append(b"\xff\xd9")
    return b"".join(out)


# --------------------------------------------------------------------------- webdataset shards
# (stages.shards reads these; tests/test_shards.py and bench/hostile.py use them)

_CHUNK = 1 << 20


def _tar_member(name: str | bytes, data: bytes, size: int | None = None) -> bytes:
    """Header (GNU format: a bytes name is written as those raw bytes) + data + padding."""
    info = tarfile.TarInfo(os.fsdecode(name) if isinstance(name, bytes) else name)
    info.size = len(data) if size is None else size
    info.mtime = 0
    head = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
    return head + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE if size is None else 0)


def tar_bytes(members: list[tuple[str | bytes, bytes]]) -> bytes:
    """An uncompressed tar of ``(name, data)`` members, in order (a name may repeat)."""
    return b"".join(_tar_member(n, d) for n, d in members) + b"\0" * (2 * tarfile.BLOCKSIZE)


def gzip_repeats(parts: list[tuple[bytes, int]]) -> bytes:
    """A valid gzip stream of each ``(chunk, times)`` in order: the chunk is deflated once
    (ending on a full flush) and its blocks repeated, so a GB of zeros is built in about a
    second (the CRC) instead of a minute, at ~1000:1."""
    body, crc, size = [], 0, 0
    for chunk, times in parts:
        co = zlib.compressobj(9, zlib.DEFLATED, -15)
        body.append((co.compress(chunk) + co.flush(zlib.Z_FULL_FLUSH)) * times)
        for _ in range(times):
            crc = zlib.crc32(chunk, crc)
        size += len(chunk) * times
    body.append(zlib.compressobj(9, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))  # an empty final block
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + b"".join(body) + struct.pack("<II", crc, size & 0xFFFFFFFF)


def gzip_bomb_tar(path, bomb_bytes: int, after: list[tuple[str | bytes, bytes]] = (),
                  name: str = "bomb/0000.jpg") -> Path:
    """A ``.tar.gz`` whose first member ``name`` is ``bomb_bytes`` zeros (a 200 MB member
    is ~200 KB of file), followed by the members ``after`` (e.g. real images that must
    still be read). Written to ``path``; returns it."""
    full, rest = divmod(bomb_bytes, _CHUNK)
    tail = b"\0" * rest + b"\0" * (-bomb_bytes % tarfile.BLOCKSIZE) + tar_bytes(list(after))
    parts = [(_tar_member(name, b"", size=bomb_bytes), 1), (b"\0" * _CHUNK, full), (tail, 1)]
    path = Path(path)
    path.write_bytes(gzip_repeats([(c, n) for c, n in parts if n]))
    return path


def huge_sidecar_tar(path, image: bytes, sidecar_bytes: int, key: str = "s/0001") -> Path:
    """A ``.tar`` with one sample: ``key.jpg`` (``image``) and a ``key.json`` sidecar of
    ``sidecar_bytes`` of valid non-ASCII JSON text (each 2-byte 'é' becomes 6 bytes once
    escaped by json.dumps: a naive reader holds ~4x the file as strings)."""
    body = b'{"note": "' + "é".encode() * max(0, (sidecar_bytes - 12) // 2) + b'"}'
    path = Path(path)
    path.write_bytes(tar_bytes([(f"{key}.jpg", image), (f"{key}.json", body)]))
    return path


NON_UTF8_NAMES = (b"s/caf\xe9.jpg", b"s/\xff\xfe.jpg")  # Latin-1 'é'; bytes no encoding maps


def non_utf8_tar(path, images: list[bytes], names: tuple[bytes, ...] = NON_UTF8_NAMES) -> Path:
    """A ``.tar`` whose members are named by raw bytes that are not UTF-8 (as GNU tar
    stores a Latin-1 file name), one image per name."""
    path = Path(path)
    path.write_bytes(tar_bytes(list(zip(names, images))))
    return path


def duplicate_names_tar(path, images: list[bytes], name: str = "s/0001.jpg") -> Path:
    """A ``.tar`` holding ``name`` once per image (tar allows it; extracting keeps the last)."""
    path = Path(path)
    path.write_bytes(tar_bytes([(name, im) for im in images]))
    return path


# --------------------------------------------------------------------------- large valid images

_PNG_MODES = {"L": (8, 0, 1), "RGB": (8, 2, 3), "RGBA": (8, 6, 4), "I;16": (16, 0, 1)}  # depth, type, channels


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _pattern_rows(width: int, y0: int, y1: int, mode: str) -> np.ndarray:
    """Rows ``y0:y1`` of diagonal stripes (periodic along x: deflate finds most of each row
    a period earlier, so a near-max_pixels PNG stays a few MB)."""
    y, x = np.mgrid[y0:y1, 0:width]
    if mode == "I;16":
        return (((x + 2 * y) % 4096) * 16).astype(">u2")
    s = (x + 2 * y) % 256
    chans = [s, (3 * s) % 256, 255 - s, np.full_like(x, 200)]
    return np.stack(chans[:_PNG_MODES[mode][2]], axis=-1).astype(np.uint8)


def large_png(width: int, height: int, mode: str = "RGB") -> bytes:
    """A valid PNG (``mode`` L, RGB, RGBA or I;16 -- 16-bit gray) of a gradient, written
    row band by row band (never the whole image in memory): 9440x9440 RGB is ~3 MB of file
    and 267 MB of pixels to decode."""
    depth, color, _ = _PNG_MODES[mode]
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))]
    co, idat = zlib.compressobj(6), []
    band = max(1, (1 << 22) // width)
    for y in range(0, height, band):
        rows = _pattern_rows(width, y, min(height, y + band), mode).reshape(min(band, height - y), -1).view(np.uint8)
        idat.append(co.compress(np.hstack([np.zeros((len(rows), 1), np.uint8), rows]).tobytes()))  # filter 0
    idat.append(co.flush())
    out += [_png_chunk(b"IDAT", b"".join(idat)), _png_chunk(b"IEND", b"")]
    return b"".join(out)


def large_webp(width: int, height: int, lossless: bool = True) -> bytes:
    """A valid WebP of a gradient (libwebp: the whole image is decoded in one C call;
    lossless ~150 ns/px on a loaded core, so 16383x5461 takes seconds). WebP sides are at
    most 16383."""
    img = Image.fromarray(_pattern_rows(width, 0, height, "RGB"))
    buf = io.BytesIO()
    img.save(buf, "WEBP", lossless=lossless, quality=0 if lossless else 50, method=0)
    return buf.getvalue()


def large_tiff(width: int, height: int, compression: str = "tiff_deflate") -> bytes:
    """A valid gray TIFF of a gradient (libtiff inflates the strips in one C call)."""
    buf = io.BytesIO()
    Image.fromarray(_pattern_rows(width, 0, height, "L")[..., 0]).save(buf, "TIFF", compression=compression)
    return buf.getvalue()


# --------------------------------------------------------------------------- bomb headers

def gif_with_header_size(width: int, height: int) -> bytes:
    """A GIF whose logical screen and first frame declare ``width x height`` (<= 65535)
    with an image stream of a clear code and an end code."""
    head = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    lzw = bytes([2, 2, 0x44, 0x01, 0])  # min code size 2; one sub-block: clear (4), end (5); terminator
    return head + frame + lzw + b"\x3b"


def tiff_with_header_size(width: int, height: int) -> bytes:
    """A little-endian TIFF whose one IFD declares an 8-bit gray ``width x height`` image
    stored in one 1-byte strip."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0),
            (277, 3, 1), (278, 4, height), (279, 4, 1)]
    ifd_at = 8
    data_at = ifd_at + 2 + 12 * len(tags) + 4
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, data_at if tag == 273 else value)
                       for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", ifd_at) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0" + b"\x80"


def webp_with_header_size(width: int, height: int) -> bytes:
    """An extended WebP whose VP8X canvas is ``width x height`` (<= 16384 a side) around a
    1x1 lossless image."""
    tiny = io.BytesIO()
    Image.new("RGB", (1, 1), (90, 120, 60)).save(tiny, "WEBP", lossless=True)
    vp8l = tiny.getvalue()[12:]  # the VP8L chunk of the simple file
    vp8x = b"VP8X" + struct.pack("<I", 10) + b"\0\0\0\0" + (width - 1).to_bytes(3, "little") \
        + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + vp8x + vp8l
    return b"RIFF" + struct.pack("<I", len(body)) + body


def truncated(data: bytes, fraction: float = 0.5) -> bytes:
    """The first ``fraction`` of a file (a transfer cut off)."""
    return data[: max(1, int(len(data) * fraction))]
