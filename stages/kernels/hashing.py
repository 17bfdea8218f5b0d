"""Stable ids and seeded per-row ranks.

Every random choice in biocurate is a function of ``(seed, id)``, never of row or block
order, so results do not depend on how Ray splits the data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np


def stable_id(location: str) -> str:
    """A 32-hex-digit id for a source location (path, URI, ``shard#member``, key)."""
    return hashlib.blake2b(location.encode("utf-8"), digest_size=16).hexdigest()


def seeded_rank(seed: int, ids: Iterable[str]) -> np.ndarray:
    """A uint64 pseudo-random rank per id, a pure function of ``(seed, id)``.

    Sorting by it is a seeded shuffle that is identical whatever the input order.
    """
    prefix = f"{int(seed)}:".encode()
    out = [
        int.from_bytes(hashlib.blake2b(prefix + i.encode("utf-8"), digest_size=8).digest(), "little")
        for i in ids
    ]
    return np.asarray(out, dtype=np.uint64)
