"""The one reject helper every stage uses: the first reject wins, values per row or one for
all, the reject columns set in place."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from manifests import rejects
from manifests.schema import Reason, Stage


def _rows(n: int = 4) -> pa.Table:
    return pa.table({"id": [f"r{i}" for i in range(n)], "x": list(range(n))})


def test_alive_without_reject_columns_is_every_row():
    assert rejects.alive(_rows()).tolist() == [True] * 4
    assert rejects.rejected(_rows()).tolist() == [False] * 4


def test_first_reject_wins_and_later_stages_see_only_alive_rows():
    t = rejects.reject(_rows(), [True, False, True, False], Stage.VALIDATE, Reason.CORRUPT,
                       ["bad 0", "unused", "bad 2", "unused"])
    assert t["reason"].to_pylist() == ["corrupt", None, "corrupt", None]
    assert t["detail"].to_pylist() == ["bad 0", None, "bad 2", None]  # only the rejected rows' details
    t = rejects.reject(t, [True, True, False, False], Stage.FILTER, Reason.BLURRY, "soft")
    assert t["stage"].to_pylist() == ["validate", "filter", "validate", None]
    assert t["reason"].to_pylist() == ["corrupt", "blurry", "corrupt", None]
    assert t["detail"].to_pylist() == ["bad 0", "soft", "bad 2", None]
    assert rejects.alive(t).tolist() == [False, False, False, True]
    assert t.column_names[:2] == ["id", "x"]  # payload untouched, reject columns appended once


def test_duplicate_of_and_reasons_per_row_from_arrow_columns():
    t = rejects.ensure_columns(_rows(3))
    t = rejects.reject(t, [False, True, False], Stage.INGEST, Reason.MISSING, "gone")
    t = rejects.reject(t, np.array([True, True, True]), Stage.NEAR_DEDUP,
                       pa.chunked_array([["perceptual_duplicate", "semantic_duplicate", "semantic_duplicate"]]),
                       pa.array(["d0", "d1", "d2"]), duplicate_of=pa.array(["k0", "k1", "k2"]))
    assert t["reason"].to_pylist() == ["perceptual_duplicate", "missing", "semantic_duplicate"]
    assert t["duplicate_of"].to_pylist() == ["k0", None, "k2"]  # the ingest reject names no duplicate
    assert t["stage"].to_pylist() == ["near_dedup", "ingest", "near_dedup"]


def test_one_schema_whatever_the_input_order_and_types():
    """Ray Data blocks of one stage must agree: the reject columns end the table, as strings,
    whether or not a row was rejected and however the input had them."""
    plain = rejects.ensure_columns(_rows(2))
    odd = pa.table({"stage": pa.nulls(2), "reason": pa.array([None, None], pa.large_string()),
                    "id": ["r0", "r1"], "detail": pa.nulls(2), "x": [0, 1]})
    schemas = set()
    for t in (_rows(2), plain, odd):
        for mask in ([False, False], [False, True]):
            got = rejects.reject(t, mask, Stage.FILTER, Reason.UNIFORM, "x")
            schemas.add(str(got.select(sorted(got.column_names)).schema) + "|" + ",".join(got.column_names[-3:]))
            assert got.column_names[-3:] == ["stage", "reason", "detail"]
            assert all(got.schema.field(c).type == pa.string() for c in rejects.REJECT_COLUMNS)
    assert len(schemas) == 1, schemas
    assert rejects.reject(plain, [False, False], Stage.FILTER, Reason.UNIFORM, "x").equals(plain)


def test_reject_rows_and_clear():
    t = rejects.reject_rows(_rows(3), Stage.INGEST, [None, (Reason.UNSAFE_PATH, "name"), ("skipped_unselected", "")])
    assert t["reason"].to_pylist() == [None, "unsafe_path", "skipped_unselected"]
    t = rejects.clear(t, [False, False, True])
    assert t["reason"].to_pylist() == [None, "unsafe_path", None] and t["stage"].to_pylist()[2] is None


def test_a_mask_of_the_wrong_length_is_an_error():
    with pytest.raises(ValueError, match="mask"):
        rejects.reject(_rows(3), [True], Stage.FILTER, Reason.UNIFORM, "x")
    with pytest.raises(ValueError, match="values for"):
        rejects.reject(_rows(3), [True, False, False], Stage.FILTER, Reason.UNIFORM, ["a"])
