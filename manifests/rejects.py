"""Reject bookkeeping, shared by every stage: which rows are still alive, and recording a
stage's rejects on a batch. A stage computes a decision (a mask, a reason, a detail per
row); :func:`reject` writes it. The first reject wins: a row rejected upstream keeps its
``stage``, ``reason``, ``detail`` (and ``duplicate_of``) whatever a later stage decides.

Vectorized on Arrow columns (``pc.if_else``), no Python loop over rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.schema import Reason, Stage

REJECT_COLUMNS = ("stage", "reason", "detail")
DUPLICATE_OF = "duplicate_of"


def alive(batch: pa.Table) -> np.ndarray:
    """Boolean mask of the rows not rejected so far (null ``reason``; all rows when the batch
    has no ``reason`` column yet)."""
    if "reason" not in batch.column_names:
        return np.ones(len(batch), dtype=bool)
    return ~np.asarray(pc.is_valid(batch["reason"]).to_numpy(zero_copy_only=False), dtype=bool)


def rejected(batch: pa.Table) -> np.ndarray:
    """The complement of :func:`alive`."""
    return ~alive(batch)


def ensure_columns(batch: pa.Table, duplicate_of: bool = False) -> pa.Table:
    """``batch`` with the reject columns last, in the order stage, reason, detail (then
    ``duplicate_of`` when asked for or already there), all of type string, null where they
    were missing. Whatever the input's order and types, one function's output has one
    schema: Ray Data blocks of one stage agree."""
    names = [*REJECT_COLUMNS, *((DUPLICATE_OF,) if duplicate_of or DUPLICATE_OF in batch.column_names else ())]
    tail = []
    for name in names:
        if name in batch.column_names:
            col = batch[name]
            tail.append(col if col.type == pa.string() else pc.cast(col, pa.string()))
        else:
            tail.append(pa.nulls(len(batch), pa.string()))
    out = batch.drop_columns([n for n in names if n in batch.column_names])
    for name, col in zip(names, tail):
        out = out.append_column(pa.field(name, pa.string()), col)
    return out


def _strings(values, n: int) -> pa.Array:
    """One string per row: a scalar (or None) broadcast, or a sequence/Arrow array of n."""
    if values is None or isinstance(values, str):
        return pa.array([None if values is None else str(values)] * n, pa.string())
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        arr = values if values.type == pa.string() else pc.cast(values, pa.string())
    else:
        arr = pa.array([None if v is None else str(v) for v in values], pa.string())
    if len(arr) != n:
        raise ValueError(f"{len(arr)} values for {n} rows")
    return arr


def _put(batch: pa.Table, name: str, values: pa.Array) -> pa.Table:
    """Replace column ``name`` (there: :func:`ensure_columns` ran) in its place."""
    return batch.set_column(batch.schema.get_field_index(name), name, values)


def reject(batch: pa.Table, mask, stage: Stage | str, reason: Reason | str | Sequence | pa.Array,
           detail: str | Sequence | pa.Array | None, duplicate_of: str | Sequence | pa.Array | None = None
           ) -> pa.Table:
    """Reject the rows of ``batch`` where ``mask`` is true and that are still alive.

    ``reason``, ``detail`` and ``duplicate_of``: one value for all, or one per row of the
    batch (only the rejected rows' values are used). The reject columns end the table
    (:func:`ensure_columns`); ``duplicate_of`` is set only when given (an existing column is
    kept as it is for the other rows)."""
    n = len(batch)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"mask of shape {mask.shape} for {n} rows")
    batch = ensure_columns(batch, duplicate_of=duplicate_of is not None)
    new = mask & alive(batch)
    if not new.any():
        return batch
    where = pa.array(new)
    out = batch
    for name, values in (("stage", str(stage)), ("reason", reason), ("detail", detail),
                         *(((DUPLICATE_OF, duplicate_of),) if duplicate_of is not None else ())):
        out = _put(out, name, pc.if_else(where, _strings(values, n), out[name].combine_chunks()))
    return out


def reject_rows(batch: pa.Table, stage: Stage | str, rejects: Sequence[tuple[Reason | str, str] | None]) -> pa.Table:
    """:func:`reject` from one ``(reason, detail)`` or None per row (the form a reader or a
    per-row check produces)."""
    mask = np.array([r is not None for r in rejects], dtype=bool)
    return reject(batch, mask, stage, [None if r is None else str(r[0]) for r in rejects],
                  [None if r is None else r[1] for r in rejects])


def clear(batch: pa.Table, mask) -> pa.Table:
    """Undo a provisional mark (e.g. a member a reader skipped as unselected): the rows where
    ``mask`` is true are alive again."""
    mask = np.asarray(mask, dtype=bool)
    batch = ensure_columns(batch)
    if not mask.any():
        return batch
    where = pa.array(mask)
    for name in REJECT_COLUMNS:
        batch = _put(batch, name, pc.if_else(where, pa.scalar(None, pa.string()), batch[name].combine_chunks()))
    return batch
