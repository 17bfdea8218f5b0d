"""Row selection on catalog/manifest columns: predicates and per-taxon caps.

Pure functions on Arrow tables: no Ray, no I/O. A predicate is a mapping with ``column``
and exactly one operator:

``eq``, ``ne`` (a value); ``in``, ``not_in`` (a list); ``gt``, ``ge``, ``lt``, ``le`` (a
value); ``between`` (``[low, high]``, inclusive); ``is_null`` (true/false).

Predicates are ANDed. Every comparison with a null cell is false -- ``ne`` and ``not_in``
included: a row whose ``family`` is unknown is neither "in [Felidae]" nor "not in
[Felidae]" -- as in SQL; only ``is_null`` selects nulls.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

OPERATORS = ("eq", "ne", "in", "not_in", "gt", "ge", "lt", "le", "between", "is_null")
_COMPARE = {"eq": pc.equal, "ne": pc.not_equal, "gt": pc.greater, "ge": pc.greater_equal,
            "lt": pc.less, "le": pc.less_equal}


def predicate_operator(pred: Mapping[str, Any]) -> str:
    ops = [k for k in OPERATORS if k in pred]
    if len(ops) != 1:
        raise ValueError(f"needs exactly one operator of {list(OPERATORS)}, got {sorted(set(pred) - {'column'})}")
    return ops[0]


def _kind(t: pa.DataType) -> str:
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_dictionary(t):
        return "string"
    if pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t):
        return "number"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_temporal(t):
        return "temporal"
    if pa.types.is_null(t):
        return "null"
    return str(t)


def _value_kind(v: Any) -> str:
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    return type(v).__name__


def check_predicates(schema: pa.Schema, preds: Sequence[Mapping[str, Any]], where: str = "select.where") -> None:
    """Raise ``ValueError`` (naming ``where[i]``) for a predicate on a missing column, with
    the wrong operand shape, or whose values cannot compare with the column's type."""
    for i, pred in enumerate(preds):
        key = f"{where}[{i}]"
        col = pred.get("column")
        if col not in schema.names:
            raise ValueError(f"{key}.column: {col!r} is not a column of the catalog/manifest ({schema.names})")
        try:
            op = predicate_operator(pred)
        except ValueError as e:
            raise ValueError(f"{key}: {e}") from None
        operand = pred[op]
        if op == "is_null":
            if not isinstance(operand, bool):
                raise ValueError(f"{key}.is_null: must be true or false")
            continue
        if op in ("in", "not_in"):
            if not isinstance(operand, list) or not operand:
                raise ValueError(f"{key}.{op}: must be a non-empty list")
            values = operand
        elif op == "between":
            if not isinstance(operand, list) or len(operand) != 2:
                raise ValueError(f"{key}.between: must be [low, high]")
            values = operand
        else:
            values = [operand]
        ck = _kind(schema.field(col).type)
        if ck == "null":
            continue  # an all-null column: every comparison is simply false
        for v in values:
            vk = _value_kind(v)
            if ck == "temporal" and vk == "string":
                continue  # ISO dates compare after a cast
            if vk != ck:
                raise ValueError(f"{key}.{op}: value {v!r} ({vk}) cannot compare with column {col!r} "
                                 f"of type {schema.field(col).type}")


def _scalar_for(column: pa.ChunkedArray | pa.Array, v: Any) -> pa.Scalar:
    t = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    return pa.scalar(v).cast(t) if not pa.types.is_null(t) else pa.scalar(v)


def predicate_mask(table: pa.Table, preds: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """Boolean numpy mask of the rows of ``table`` satisfying every predicate."""
    keep = np.ones(len(table), dtype=bool)
    for pred in preds:
        col = table.column(pred["column"])
        if pa.types.is_dictionary(col.type):
            col = col.cast(col.type.value_type)
        op = predicate_operator(pred)
        operand = pred[op]
        if op == "is_null":
            m = pc.is_null(col) if operand else pc.is_valid(col)
        elif pa.types.is_null(col.type):
            m = pa.array(np.zeros(len(table), dtype=bool))
        elif op in ("in", "not_in"):
            values = pa.array(operand).cast(col.type)
            m = pc.is_in(col, value_set=values)
            m = pc.and_(pc.invert(m), pc.is_valid(col)) if op == "not_in" else m
        elif op == "between":
            lo, hi = (_scalar_for(col, v) for v in operand)
            m = pc.and_(pc.greater_equal(col, lo), pc.less_equal(col, hi))
        else:
            m = _COMPARE[op](col, _scalar_for(col, operand))
        keep &= np.asarray(pc.fill_null(m, False).to_numpy(zero_copy_only=False), dtype=bool)
    return keep


def cap_per_group(groups: np.ndarray, rank: np.ndarray, cap: int) -> np.ndarray:
    """Keep at most ``cap`` rows per group value: the ``cap`` lowest ranks (e.g.
    ``seeded_rank(seed, ids)``). Rows whose group is null (None) are all kept.

    Returns a boolean keep mask; independent of row order.
    """
    n = len(groups)
    keep = np.ones(n, dtype=bool)
    if n == 0 or cap < 0:
        return keep
    g = np.asarray(groups, dtype=object)
    known = np.array([x is not None for x in g], dtype=bool)
    idx = np.flatnonzero(known)
    if not len(idx):
        return keep
    keys = g[idx].astype(str)
    order = idx[np.lexsort((np.asarray(rank, dtype=np.uint64)[idx], keys))]
    sorted_keys = g[order].astype(str)
    starts = np.r_[0, np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1]
    pos = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep[order[pos >= cap]] = False
    return keep
