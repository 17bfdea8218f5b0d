"""64-bit DCT perceptual hash (pHash), as in imagehash/pHash: 32x32 grayscale, 2-D DCT,
the 8x8 lowest frequencies compared with their median."""

from __future__ import annotations

import numpy as np

_N = 32


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_D = _dct_matrix(_N)
_BITS = (np.uint64(1) << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash64(gray: np.ndarray) -> int:
    """pHash of a 32x32 grayscale array (any numeric dtype). Returns an unsigned 64-bit int.

    The most significant bit is the DC-adjacent coefficient (row-major over the 8x8 block).
    """
    g = np.asarray(gray, dtype=np.float64)
    if g.shape != (_N, _N):
        raise ValueError(f"phash64 needs a {_N}x{_N} array, got {g.shape}")
    coeffs = _D @ g @ _D.T
    low = coeffs[:8, :8].ravel()
    bits = low > np.median(low)
    return int(np.bitwise_or.reduce(np.where(bits, _BITS, np.uint64(0))))


def hamming64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distance between arrays of uint64 hashes."""
    x = np.bitwise_xor(np.asarray(a, dtype=np.uint64), np.asarray(b, dtype=np.uint64))
    return np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
