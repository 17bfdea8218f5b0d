"""Select: narrow a corpus to the requested subset on catalog/manifest columns, and join
image rows to their catalog row. Per-batch functions, Ray-free; ``pipeline.catalog``
maps them onto Ray Data.

Columns used here:

* ``_join_key`` -- the string key an image row and a catalog row meet on;
* ``_selected`` -- on catalog rows: passed every predicate and the per-taxon cap;
* ``_from_catalog`` / ``_from_input`` -- which side of a full outer join a row came from.
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.rejects import clear, ensure_columns, reject
from manifests.schema import Reason, Stage
from stages.kernels.hashing import seeded_rank
from stages.shards import SKIPPED
from stages.kernels.select import cap_per_group, predicate_mask

JOIN_KEY = "_join_key"
SELECTED = "_selected"
FROM_CATALOG = "_from_catalog"
FROM_INPUT = "_from_input"
RANK_ID = "_rank_id"
KEY_COPIES = "_key_copies"  # on catalog rows: how many catalog rows had this key (one is kept)


def _set(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        table = table.drop_columns([name])
    return table.append_column(name, values)


def with_join_key(table: pa.Table, column: str, basename: bool = False) -> pa.Table:
    """Add ``_join_key`` = the column's value as a string (its basename for webdataset keys)."""
    values = table.column(column).to_pylist()
    keys = [None if v is None else (posixpath.basename(str(v)) if basename else str(v)) for v in values]
    return _set(table, JOIN_KEY, pa.array(keys, pa.string()))


def one_row_per_key(table: pa.Table) -> pa.Table:
    """Catalog rows -> one row per ``_join_key`` (``table`` holds every row of each key
    it contains), so that an image joins one catalog row, never two. The row kept is the
    one with the lowest hash of its content (the same whatever the row order); it carries
    ``_key_copies`` (how many rows had its key). Rows without a key are all kept."""
    from stages.ids import ID_PART, content_digests

    table = table.drop_columns([c for c in (ID_PART, KEY_COPIES) if c in table.column_names])
    keys = table.column(JOIN_KEY).to_pylist()
    digests = content_digests(table, np.arange(len(table)))
    best: dict[str, int] = {}
    copies: dict[str, int] = {}
    keep = np.ones(len(table), dtype=bool)
    for i, k in enumerate(keys):
        if k is None:
            continue
        copies[k] = copies.get(k, 0) + 1
        j = best.get(k)
        if j is None or digests[i] < digests[j]:
            if j is not None:
                keep[j] = False
            best[k] = i
        else:
            keep[i] = False
    out = table.filter(pa.array(keep))
    return _set(out, KEY_COPIES, pa.array([copies.get(k, 1) for k in out.column(JOIN_KEY).to_pylist()], pa.int32()))


def mark_predicates(table: pa.Table, preds: list[dict], rank_column: str) -> pa.Table:
    """Add ``_selected`` (passes every predicate) and ``_rank_id`` (what the per-taxon cap
    hashes with the seed: the row's id or catalog key)."""
    mask = predicate_mask(table, preds) if preds else np.ones(len(table), dtype=bool)
    table = _set(table, SELECTED, pa.array(mask, pa.bool_()))
    ranks = table.column(rank_column).cast(pa.string())
    return _set(table, RANK_ID, ranks)


def cap_group(table: pa.Table, column: str, cap: int, seed: int) -> pa.Table:
    """Within rows of one (or several) taxa, unselect all but the ``cap`` lowest
    ``seeded_rank(seed, _rank_id)`` among the rows still selected."""
    selected = np.asarray(table.column(SELECTED).to_numpy(zero_copy_only=False), dtype=bool)
    idx = np.flatnonzero(selected)
    if len(idx):
        taxa = np.asarray(table.column(column).to_pylist(), dtype=object)[idx]
        ids = [str(x) for x in np.asarray(table.column(RANK_ID).to_pylist(), dtype=object)[idx]]
        keep = cap_per_group(taxa, seeded_rank(seed, ids), cap)
        selected[idx[~keep]] = False
    return _set(table, SELECTED, pa.array(selected, pa.bool_()))


def selected_keys(batch: pa.Table) -> list[str]:
    """The join keys of the selected rows of a flagged batch."""
    return [k for k, s in zip(batch.column(JOIN_KEY).to_pylist(), batch.column(SELECTED).to_pylist())
            if s and k is not None]


def count_selection(batch: pa.Table) -> pa.Table:
    """One row of counts: rows, selected, catalog rows dropped because another row had
    their key (for summing across blocks)."""
    sel = np.asarray(batch.column(SELECTED).to_numpy(zero_copy_only=False), dtype=bool)
    extra = 0
    if KEY_COPIES in batch.column_names:
        extra = int(np.asarray(batch.column(KEY_COPIES).fill_null(1).to_numpy(zero_copy_only=False)).sum()) - len(batch)
    return pa.table({"rows": [len(batch)], "selected": [int(sel.sum())], "duplicate_keys": [extra]})


def classify_joined(table: pa.Table) -> pa.Table:
    """After a full outer join of input rows with flagged catalog rows, keep:

    * input rows with a selected catalog row (alive),
    * input rows with no catalog row (rejected ``not_in_catalog``, stage ``select``),

    and drop input rows whose catalog row is unselected and catalog rows without an image
    (both are counted by :func:`count_joined`, not rejected).
    """
    from_input = _flag(table, FROM_INPUT)
    from_catalog = _flag(table, FROM_CATALOG)
    selected = _flag(table, SELECTED)
    keep = from_input & (selected | ~from_catalog)
    out = table.filter(pa.array(keep))
    orphan = ~_flag(out, FROM_CATALOG)
    out = ensure_columns(out)
    skipped = np.asarray(pc.equal(out["reason"], SKIPPED).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    out = clear(out, skipped)  # a member the reader skipped as unselected: decided here
    keys = out.column(JOIN_KEY).to_pylist()
    out = reject(out, orphan, Stage.SELECT, Reason.NOT_IN_CATALOG,
                 [f"no catalog row with key {k!r}" if o else None for k, o in zip(keys, orphan)])
    # cannot happen (a Bloom filter has no false negatives), but never an alive row unread
    out = reject(out, skipped & ~orphan, Stage.INGEST, Reason.READ_ERROR,
                 "skipped by the selection pre-filter although selected")
    return out.drop_columns([c for c in (JOIN_KEY, SELECTED, FROM_CATALOG, FROM_INPUT, RANK_ID, KEY_COPIES)
                             if c in out.column_names])


def count_joined(table: pa.Table) -> pa.Table:
    from_input = _flag(table, FROM_INPUT)
    from_catalog = _flag(table, FROM_CATALOG)
    selected = _flag(table, SELECTED)
    return pa.table({
        "unselected": [int((from_input & from_catalog & ~selected).sum())],
        "not_in_catalog": [int((from_input & ~from_catalog).sum())],
        "catalog_without_image": [int((from_catalog & ~from_input).sum())],
    })


def _flag(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.zeros(len(table), dtype=bool)
    return np.asarray(table.column(name).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
