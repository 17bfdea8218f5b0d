"""Broadcast joins: the Arrow kernel on hand-checked tables, then both Ray paths
(broadcast and Ray Data's hash shuffle) giving the same rows on a real Ray."""

import numpy as np
import pyarrow as pa
import pytest

from stages import joins as sj


def _emb(rows):
    return pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(rows, np.float16).ravel()), 2)


def test_take_join_left_outer_and_inner_with_list_and_embedding_columns():
    left = pa.table({"id": ["a", "b", "c", None, "a"], "x": [1, 2, 3, 4, 5]})
    right = pa.table({"id": ["c", "a", "z"], "emb": _emb([[1, 2], [3, 4], [5, 6]]),
                      "ids": pa.array([["q"], None, ["r", "s"]], pa.list_(pa.string()))})
    got = sj.take_join(left, right, "id", "left_outer")
    assert got.column_names == ["id", "x", "emb", "ids"]
    assert got["x"].to_pylist() == [1, 2, 3, 4, 5]  # every left row, in order
    assert got["emb"].to_pylist() == [[3, 4], None, [1, 2], None, [3, 4]]
    assert got["ids"].to_pylist() == [None, None, ["q"], None, None]
    assert got.schema.field("emb").type == right.schema.field("emb").type
    inner = sj.take_join(left, right, "id", "inner")
    assert inner["id"].to_pylist() == ["a", "c", "a"] and inner["emb"].to_pylist() == [[3, 4], [1, 2], [3, 4]]
    # an empty right side, and keys of another string type
    empty = sj.take_join(left, right.slice(0, 0), "id", "left_outer")
    assert empty["emb"].null_count == 5
    large = right.set_column(0, "id", right["id"].cast(pa.large_string()))
    assert sj.take_join(left, large, "id", "inner")["x"].to_pylist() == [1, 3, 5]
    with pytest.raises(ValueError, match="both sides"):
        sj.take_join(left, right.append_column("x", pa.array([0, 0, 0])), "id", "inner")
    with pytest.raises(ValueError, match="how"):
        sj.take_join(left, right, "id", "full_outer")


def test_first_per_key_keeps_the_first_row_of_each_key():
    t = pa.table({"k": ["b", "a", "b", None, "a", "c"], "v": [0, 1, 2, 3, 4, 5]})
    got = sj.first_per_key(t, "k")
    assert got["k"].to_pylist() == ["b", "a", "c"] and got["v"].to_pylist() == [0, 1, 5]
    assert len(sj.first_per_key(t.slice(0, 0), "k")) == 0


def test_split_groups_by_one_and_two_keys_with_nulls():
    t = pa.table({"k": ["b", None, "a", "b", None, "a", "c"], "j": [1, 1, 2, 1, None, 2, None],
                  "v": list(range(7))})
    one = [g["v"].to_pylist() for g in sj.split_groups(t, "k")]
    assert one == [[2, 5], [0, 3], [6], [1, 4]]  # key order, nulls one group at the end, input order kept
    two = [g["v"].to_pylist() for g in sj.split_groups(t, ["k", "j"])]
    assert two == [[2, 5], [0, 3], [6], [1], [4]]  # (None, 1) and (None, None) differ
    assert list(sj.split_groups(t.slice(0, 0), "k")) == []
    # a key column of nulls only (an empty CSV column) is one group; NaN keys are one group
    assert [len(g) for g in sj.split_groups(pa.table({"k": pa.nulls(4), "v": range(4)}), "k")] == [4]
    f = pa.table({"k": [1.0, float("nan"), None, float("nan"), 1.0], "v": range(5)})
    assert sorted(len(g) for g in sj.split_groups(f, "k")) == [1, 2, 2]
    assert [g["v"].to_pylist() for g in sj.split_groups(t.slice(0, 1), "k")] == [[0]]


def _group_summary(group: pa.Table, tag: str) -> pa.Table:
    v = sorted(group["v"].to_pylist())
    return pa.table({"k": [group["k"][0].as_py()], "n": [len(group)], "vs": [v], "tag": [tag]})


def test_one_partition_groups_locally_as_ray_groupby_does(ray_local):
    import ray

    from pipeline import joins

    rng = np.random.default_rng(1)
    keys = rng.integers(0, 40, 2000).astype(object)
    keys[rng.random(2000) < 0.05] = None
    t = pa.table({"k": pa.array(keys, pa.int64()), "v": np.arange(2000)})
    ds = ray.data.from_arrow(t).repartition(9)

    def rows(out):
        return sorted((r["k"] if r["k"] is not None else -1, r["n"], r["vs"], r["tag"]) for r in out.take_all())

    local = joins.map_groups(ds, "k", _group_summary, 1, {"tag": "x"})
    ray_groups = ds.groupby("k", num_partitions=1).map_groups(_group_summary, batch_format="pyarrow",
                                                               fn_kwargs={"tag": "x"})
    assert rows(local) == rows(ray_groups)
    assert rows(joins.map_groups(ds, "k", _group_summary, 3, {"tag": "x"})) == rows(ray_groups)
    assert sum(n for _, n, _, _ in rows(local)) == 2000 and len(rows(local)) == 41


@pytest.mark.parametrize("how", ["inner", "left_outer"])
def test_broadcast_and_shuffle_joins_agree_on_ray(ray_local, how):
    import ray

    from pipeline import joins

    rng = np.random.default_rng(0)
    n = 3000
    left = ray.data.from_arrow(pa.table({"id": [f"r{i}" for i in range(n)], "x": np.arange(n)})).repartition(7)
    keep = rng.choice(n, 1000, replace=False)
    vec = rng.standard_normal((1000, 2))
    right = pa.table({"id": [f"r{i}" for i in keep] + [f"r{keep[0]}"],  # a key twice (same values): one row
                      "emb": _emb(np.r_[vec, vec[:1]]), "w": np.r_[keep, keep[0]]})

    def rows(ds):
        t = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
        return sorted(zip(t["id"].to_pylist(), t["x"].to_pylist(), t["w"].to_pylist(), t["emb"].to_pylist()),
                      key=lambda r: r[1])

    broadcast = rows(joins.join(left, ray.data.from_arrow(right), "id", how, limit_mb=64, unique=True))
    shuffled = rows(joins.join(left, ray.data.from_arrow(right), "id", how, limit_mb=0, unique=True))
    assert broadcast == shuffled
    assert len(broadcast) == (1000 if how == "inner" else n)
    assert all(w == int(i[1:]) for i, _, w, _ in broadcast if w is not None)
    # a right side over the limit is not collected: the shuffle path is taken
    assert joins.collect_small(ray.data.from_arrow(right), 1000) is None
    assert len(joins.collect_small(ray.data.from_arrow(right), 2**20)) == 1001


def test_stage_tables_are_written_one_row_group_per_block(ray_local, tmp_path):
    """A block assembled by map_groups holds one small table per group; written as it is,
    parquet gets one row group per group (7,200 one-row groups for 7,200 rows in a real
    run, which every later stage paid for). ``write_parquet_dir`` writes one per block."""
    import fsspec
    import pyarrow.parquet as pq
    import ray

    from pipeline.rundir import write_parquet_dir

    ds = ray.data.from_arrow(pa.table({"k": np.arange(2000) % 500, "v": np.arange(2000)})).groupby(
        "k", num_partitions=2).map_groups(lambda g: g.slice(0, 1), batch_format="pyarrow")
    write_parquet_dir(ds, fsspec.filesystem("file"), str(tmp_path / "out"))
    files = sorted((tmp_path / "out").glob("*.parquet"))
    meta = [pq.ParquetFile(f).metadata for f in files]
    assert sum(m.num_rows for m in meta) == 500
    assert sum(m.num_row_groups for m in meta) <= 2 * len(files), [m.num_row_groups for m in meta]
