"""Exact-duplicate resolution on content hashes."""

from __future__ import annotations

import numpy as np


def resolve_exact_duplicates(
    sha256: np.ndarray, rank: np.ndarray, placeholder_min_copies: int
) -> tuple[np.ndarray, np.ndarray]:
    """Decide, for rows grouped by identical content hash, which are kept.

    Parameters
    ----------
    sha256 : array of str, one per row.
    rank : uint64 array, the keep priority per row (lowest kept), e.g.
        :func:`stages.kernels.hashing.seeded_rank` of the ids.
    placeholder_min_copies : a hash shared by this many rows or more is a placeholder
        ("image unavailable" pictures served by sources): every copy is rejected.
        ``0`` disables the rule.

    Returns
    -------
    status : int8 array: 0 kept, 1 exact duplicate, 2 placeholder.
    keeper : int64 array: for duplicates the row index of the kept copy, else -1.
    """
    sha256 = np.asarray(sha256)
    rank = np.asarray(rank, dtype=np.uint64)
    n = len(sha256)
    status = np.zeros(n, dtype=np.int8)
    keeper = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return status, keeper
    order = np.lexsort((rank, sha256))  # by hash, then rank
    s = sha256[order]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    sizes = np.diff(np.r_[starts, n])
    for start, size in zip(starts, sizes):
        if size == 1:
            continue
        members = order[start : start + size]
        if placeholder_min_copies and size >= placeholder_min_copies:
            status[members] = 2
        else:
            status[members[1:]] = 1
            keeper[members[1:]] = members[0]
    return status, keeper
