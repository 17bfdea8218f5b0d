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
import struct
import zlib

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
