"""A Bloom filter over string keys (numpy bit array; double hashing from one BLAKE2b).

No false negatives: a key that was added is always reported present. False positives at
about ``fp_rate`` for ``n`` keys.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable

import numpy as np


def bloom_size(n: int, fp_rate: float) -> tuple[int, int]:
    """(bits, hash count) for ``n`` keys at false-positive rate ``fp_rate``."""
    n = max(1, n)
    m = max(64, int(math.ceil(-n * math.log(fp_rate) / (math.log(2) ** 2))))
    k = max(1, round(m / n * math.log(2)))
    return m, k


def _positions(keys: Iterable[str], m: int, k: int) -> np.ndarray:
    h = [hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest() for key in keys]
    if not h:
        return np.zeros((0, k), dtype=np.uint64)
    raw = np.frombuffer(b"".join(h), dtype=np.uint64).reshape(-1, 2)
    i = np.arange(k, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return (raw[:, :1] + i[None, :] * (raw[:, 1:] | np.uint64(1))) % np.uint64(m)


def bloom_add(bits: np.ndarray, keys: Iterable[str], k: int) -> None:
    """Set the bits of ``keys`` in ``bits`` (a uint8 array of ``m // 8`` bytes), in place."""
    m = bits.size * 8
    pos = _positions(keys, m, k).ravel()
    np.bitwise_or.at(bits, (pos >> np.uint64(3)).astype(np.int64), (1 << (pos & np.uint64(7))).astype(np.uint8))


def bloom_contains(bits: np.ndarray, keys: list[str], k: int) -> np.ndarray:
    """Boolean array: may each key have been added?"""
    m = bits.size * 8
    pos = _positions(keys, m, k)
    hit = (bits[(pos >> np.uint64(3)).astype(np.int64)] >> (pos & np.uint64(7)).astype(np.uint8)) & 1
    return hit.astype(bool).all(axis=1) if len(keys) else np.zeros(0, dtype=bool)


def new_bloom(n: int, fp_rate: float = 0.01) -> tuple[np.ndarray, int]:
    m, k = bloom_size(n, fp_rate)
    return np.zeros((m + 7) // 8, dtype=np.uint8), k
