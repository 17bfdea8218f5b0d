"""Duplicate removal. Exact duplicates (identical sha256) here; near-duplicates later.

The exact step is global: ``pipeline.plan`` groups the narrow table by a hash partition of
``sha256`` (``groupby().map_groups``), so every copy of one content hash reaches the same
call; one call decides a whole partition (about 250k rows), which bounds its memory.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from manifests.config import ExactDedupConfig
from manifests.rejects import alive, reject
from manifests.schema import ID, Reason, Stage
from stages.kernels.exact_dedup import resolve_exact_duplicates
from stages.kernels.hashing import seeded_rank


def exact_dedup_batch(table: pa.Table, cfg: ExactDedupConfig, seed: int) -> pa.Table:
    """Mark exact duplicates among the rows of ``table`` that are still alive.

    Columns in: id, sha256, stage, reason, detail. Adds ``duplicate_of`` (the kept id).
    The kept copy of a group is the lowest ``seeded_rank(seed, id)``: independent of row
    order. Rows rejected earlier are passed through unchanged.
    """
    n = len(table)
    live = alive(table)
    rows = np.flatnonzero(live)
    dup_of: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    duplicate, placeholder = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
    if len(rows):
        ids = np.asarray(table.column(ID).to_pylist(), dtype=object)[rows]
        sha = np.asarray(table.column("sha256").to_pylist(), dtype=object)[rows]
        status, keeper = resolve_exact_duplicates(sha.astype(str), seeded_rank(seed, ids),
                                                  cfg.placeholder_min_copies)
        group_size: dict[str, int] = {}
        for s in sha:
            group_size[s] = group_size.get(s, 0) + 1
        duplicate[rows], placeholder[rows] = status == 1, status == 2
        for j, row in enumerate(rows):
            if status[j] == 1:
                dup_of[row] = ids[keeper[j]]
                detail[row] = f"byte-identical to {ids[keeper[j]]} (sha256 {sha[j][:16]}…)"
            elif status[j] == 2:
                detail[row] = (f"sha256 {sha[j][:16]}… shared by {group_size[sha[j]]} inputs "
                               f"(>= placeholder_min_copies {cfg.placeholder_min_copies})")
    out = reject(table, duplicate, Stage.EXACT_DEDUP, Reason.EXACT_DUPLICATE, detail, duplicate_of=dup_of)
    return reject(out, placeholder, Stage.EXACT_DEDUP, Reason.PLACEHOLDER, detail)
