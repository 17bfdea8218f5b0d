"""Joins of a batch with a small table held whole (a broadcast join), on Arrow.

Ray Data's ``Dataset.join`` hash-shuffles both sides through aggregator actors: the right
thing when both sides are large, but each one starts processes and moves every row. When
one side is small (the decisions of a global step: group members, sampled rows; the
previous run's rows of a small corpus), every batch of the large side can look its keys
up in that side directly. ``pipeline.joins`` chooses between the two."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

HOW = ("inner", "left_outer")


def first_per_key(table: pa.Table, on: str) -> pa.Table:
    """``table`` with one row per distinct non-null ``on`` value (its first row)."""
    if len(table) == 0:
        return table
    key = table[on].combine_chunks()
    valid = np.asarray(key.is_valid().to_numpy(zero_copy_only=False))
    codes = pc.dictionary_encode(key).indices.to_numpy(zero_copy_only=False)
    rows = np.flatnonzero(valid)
    _, first = np.unique(codes[rows], return_index=True)
    return table.take(pa.array(np.sort(rows[first])))


def take_join(batch: pa.Table, right: pa.Table, on: str, how: str = "left_outer") -> pa.Table:
    """``batch`` joined with ``right`` (unique keys in ``on``: see :func:`first_per_key`)
    on column ``on``: ``batch``'s columns then ``right``'s others. ``left_outer`` keeps
    every row of ``batch`` (nulls where ``right`` has no match, in ``batch``'s order);
    ``inner`` only the matched ones. Columns of any type (lists, fixed-size embeddings)."""
    if how not in HOW:
        raise ValueError(f"take_join: how must be one of {HOW}, not {how!r}")
    clash = (set(batch.column_names) & set(right.column_names)) - {on}
    if clash:
        raise ValueError(f"take_join: columns on both sides: {sorted(clash)}")
    values = right[on].combine_chunks() if len(right) else pa.array([], right.schema.field(on).type)
    if values.type != batch.schema.field(on).type:
        values = values.cast(batch.schema.field(on).type)
    idx = pc.index_in(batch[on], value_set=values)
    if how == "inner":
        hit = pc.is_valid(idx)
        batch, idx = batch.filter(hit), idx.filter(hit)
    taken = right.drop_columns([on]).take(idx)
    for name in taken.column_names:
        batch = batch.append_column(right.schema.field(name), taken[name])
    return batch


def split_groups(table: pa.Table, keys: str | list[str]):
    """The groups of ``table`` by ``keys`` (rows with equal keys; nulls equal to nulls), one
    table each, in key order: what Ray Data's ``groupby(keys).map_groups`` hands its function
    one call at a time."""
    keys = [keys] if isinstance(keys, str) else list(keys)
    if len(table) == 0:
        return
    table = table.sort_by([(k, "ascending", "at_end") for k in keys])
    change = np.zeros(len(table) - 1, dtype=bool)
    for k in keys:
        col = table[k].combine_chunks()
        if pa.types.is_null(col.type):  # a column of nulls only: one value
            continue
        a, b = col.slice(1), col.slice(0, len(col) - 1)
        differ = np.asarray(pc.fill_null(pc.not_equal(a, b), False).to_numpy(zero_copy_only=False), bool)
        if pa.types.is_floating(col.type):  # NaN equals NaN, as in Ray's groups
            differ &= ~np.asarray(pc.fill_null(pc.and_(pc.is_nan(a), pc.is_nan(b)), False)
                                  .to_numpy(zero_copy_only=False), bool)
        nulls = pc.xor(a.is_null(), b.is_null()).to_numpy(zero_copy_only=False)
        change |= differ | np.asarray(nulls, bool)
    starts = np.concatenate([[0], np.flatnonzero(change) + 1, [len(table)]])
    for lo, hi in zip(starts[:-1], starts[1:]):
        yield table.slice(int(lo), int(hi - lo))
