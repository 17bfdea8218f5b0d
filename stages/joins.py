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
