"""Unique ids per input row on Ray Data (the per-partition work is ``stages.ids``).

Rows of a manifest or of a parquet input's metadata (no image bytes yet) are brought
together by a hash partition of their id, so that every row of one id meets in one call,
which gives repeats an ordinal id. One call decides a whole partition (one call per id
would be a Python call and a block per row). The rows that got an ordinal carry
``_id_repeat``; the manifest step counts them and drops the column.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import joins
from stages import ids as sids


def _drop_base(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in (sids.ID_BASE,) if c in batch.column_names])


def _unique_partition(batch: pa.Table, order: tuple[str, ...], column: str) -> pa.Table:
    return _drop_base(sids.unique_ids(batch, order, column))


def _no_repeat(batch: pa.Table, column: str, repeated) -> pa.Table:
    """Rows whose id no other row has (all of them without ``repeated``): base dropped,
    ``_id_repeat`` null."""
    if repeated is not None:
        batch = batch.filter(pc.invert(pc.is_in(batch[column], value_set=joins.resolve_ref(repeated))))
    batch = _drop_base(batch).drop_columns([c for c in (sids.REPEAT,) if c in batch.column_names])
    return batch.append_column(sids.REPEAT, pa.nulls(len(batch), pa.int32()))


def _only(batch: pa.Table, column: str, repeated) -> pa.Table:
    return batch.filter(pc.is_in(batch[column], value_set=joins.resolve_ref(repeated)))


def _ids(batch: pa.Table, column: str) -> pa.Table:
    return batch.select([column])


def unique_ids(ds: ray.data.Dataset, rows_estimate: int, order: tuple[str, ...] = (),
               column: str = sids.ID, driver_rows: int = 4_000_000) -> ray.data.Dataset:
    """``ds`` (the id ``column``, ``_id_base``, optional ``order`` columns) with every id
    unique, materialized (a shuffle must not run inside the streaming pass, beside the
    embedding actors that hold the CPUs it would wait for).

    Up to ``driver_rows`` rows (~130 MB of ids): the ids are counted on the driver, and only
    the rows of repeated ids (rare) are renumbered there; no shuffle. Above: a hash shuffle
    by id partition, ~250,000 rows per partition from ``rows_estimate``."""
    ds = ds.materialize()
    if rows_estimate <= driver_rows:
        ids = [b[column] for b in ds.map_batches(_ids, batch_format="pyarrow", fn_kwargs={"column": column})
               .iter_batches(batch_format="pyarrow", batch_size=None) if len(b)]
        if not ids:
            return ds.map_batches(_no_repeat, batch_format="pyarrow", fn_kwargs={"column": column, "repeated": None})
        counted = pc.value_counts(pa.chunked_array(ids).combine_chunks())
        repeated = counted.field("values").filter(pc.greater(counted.field("counts"), 1))
        if not len(repeated):
            return ds.map_batches(_no_repeat, batch_format="pyarrow",
                                  fn_kwargs={"column": column, "repeated": None}).materialize()
        ref = ray.put(repeated)
        rows = [b for b in ds.map_batches(_only, batch_format="pyarrow", fn_kwargs={"column": column, "repeated": ref})
                .iter_batches(batch_format="pyarrow", batch_size=None) if len(b)]
        fixed = _drop_base(sids.unique_ids(pa.concat_tables(rows, promote_options="default"), order, column))
        rest = ds.map_batches(_no_repeat, batch_format="pyarrow", fn_kwargs={"column": column, "repeated": ref})
        return rest.union(ray.data.from_arrow(fixed)).materialize()
    parts = joins.shuffle_partitions(rows_estimate, 250_000)
    return joins.map_groups(
        ds.map_batches(sids.id_partition, batch_format="pyarrow", fn_kwargs={"parts": parts, "column": column}),
        sids.ID_PART, _unique_partition, parts, {"order": order, "column": column}).materialize()


def _sorted_group(group: pa.Table, columns: tuple[str, ...]) -> pa.Table:
    return group.sort_by([(c, "ascending") for c in columns])


def by_row_group(ds: ray.data.Dataset, rows_estimate: int, regroup: bool = True,
                 columns: tuple[str, str] = ("_pq_file", "_pq_row_group")) -> ray.data.Dataset:
    """Parquet metadata rows grouped by (file, row group), each group's rows contiguous,
    materialized (a shuffle must not run beside the embedding actors, which hold the CPUs
    it would wait for). Without ``regroup`` the rows are taken as they come: metadata read
    one row group per block is grouped already (a group split over blocks is only read
    twice, never lost)."""
    ds = ds.materialize()
    if not regroup or ds.count() == 0:
        return ds
    parts = joins.shuffle_partitions(rows_estimate, 50_000)
    return joins.map_groups(ds, list(columns), _sorted_group, parts, {"columns": columns}).materialize()


def _repeats(batch: pa.Table) -> pa.Table:
    n = 0 if sids.REPEAT not in batch.column_names else len(batch) - batch[sids.REPEAT].null_count
    return pa.table({"n": [n]})


def count_repeats(ds: ray.data.Dataset) -> int:
    """Rows whose source named a place another row also named (they got an ordinal id)."""
    schema = ds.schema()
    if schema is None or sids.REPEAT not in schema.names:
        return 0
    return sum(r["n"] for r in ds.select_columns([sids.REPEAT]).map_batches(_repeats, batch_format="pyarrow").take_all())


def drop_repeat(batch: pa.Table) -> pa.Table:
    return batch.drop_columns([c for c in (sids.REPEAT,) if c in batch.column_names])


def table_rows_estimate(files: list[str], storage) -> int:
    """Rows of a table input without reading it: a parquet file's footer count; a CSV or
    JSONL file's size over 32 bytes (a row with a uri rarely holds less). Only the number
    of shuffle partitions depends on it, never which rows are kept."""
    from manifests.io import filesystem
    from stages.parquet_cells import parquet_footer

    total = 0
    for f in files:
        fs, p = filesystem(f, storage)
        if p.lower().endswith(".parquet"):
            with fs.open(p, "rb") as fh:
                total += parquet_footer(fh).num_rows
        else:
            total += -(-int(fs.size(p) or 0) // 32)
    return total
