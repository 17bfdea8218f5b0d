"""Catalog join and subset selection on Ray Data (the per-batch work is in stages.select).

* ``select`` stage (global, before any image byte is read): the catalog (else the manifest,
  or a parquet input's own metadata columns) gets a ``_selected`` flag: the ``select.where``
  predicates, then ``select.max_per_taxon`` as a groupby on the taxon column, keeping the
  lowest hash(seed, id) per taxon. Written to ``stages/select``.
* join: input rows meet flagged catalog rows in a distributed full outer join on
  ``_join_key``; input rows without a catalog row are rejected ``not_in_catalog``, rows
  whose catalog row is unselected are dropped and counted (they were never part of the
  requested subset), catalog rows without an image are counted.
"""

from __future__ import annotations

import pyarrow as pa
import ray

import stages.select as sel
from manifests import io as mio
from manifests.schema import ID, check_columns
from pipeline import ids as pipeline_ids
from pipeline import joins
from manifests.config import PipelineConfig
from stages import ids, ingest
from stages.kernels.bloom import bloom_add, new_bloom
from stages.kernels.select import check_predicates


def read_table(paths: list[str], cfg: PipelineConfig) -> ray.data.Dataset:
    files = ingest.list_tables(paths, cfg.storage, tuple(ingest.TABLE_SUFFIXES))
    fs, _ = mio.filesystem(paths[0], cfg.storage)
    fmt = ingest.TABLE_SUFFIXES[("." + files[0].rsplit(".", 1)[-1]).lower()]
    reader = {"parquet": ray.data.read_parquet, "csv": ray.data.read_csv, "json": ray.data.read_json}[fmt]
    return reader(files, filesystem=mio.arrow_filesystem(fs))


def source_schema(cfg: PipelineConfig, kind: str) -> pa.Schema | None:
    """Schema of the table selection runs on (catalog, else manifest, else parquet
    metadata), read from its first file; None when there is none."""
    path = cfg.catalog.path or (cfg.input.paths()[0] if kind in ("manifest", "parquet_bytes") else None)
    if path is None:
        return None
    first = ingest.list_tables([path], cfg.storage, tuple(ingest.TABLE_SUFFIXES))[0]
    fs, p = mio.filesystem(first, cfg.storage)
    if p.lower().endswith(".parquet"):
        import pyarrow.parquet as pq

        with fs.open(p, "rb") as f:
            return pq.read_schema(f)
    import io

    import pyarrow.csv as pacsv
    import pyarrow.json as pajson

    with fs.open(p, "rb") as f:  # types inferred from the first MiB, as the reader will
        head = f.read(1 << 20)
    cut = head[: head.rfind(b"\n") + 1] or head
    reader = pacsv.read_csv if p.lower().endswith(".csv") else pajson.read_json
    return reader(io.BytesIO(cut)).schema


def check_selection(cfg: PipelineConfig, kind: str) -> None:
    """Before the run: predicates and caps name existing columns of the right type."""
    needs = cfg.select.active or cfg.catalog.path
    if not needs:
        return
    if kind == "webdataset" and not cfg.catalog.path and cfg.select.active:
        raise ValueError("select: webdataset input needs catalog.path (its metadata lives in the catalog)")
    schema = source_schema(cfg, kind)
    if schema is None:
        raise ValueError("select: needs a catalog (catalog.path) or a table input")
    check_predicates(schema, cfg.select.predicates())
    if cfg.select.max_per_taxon:
        check_columns(schema.names, {cfg.select.max_per_taxon.column: "select.max_per_taxon.column"})
    if cfg.catalog.path:
        check_columns(schema.names, {cfg.catalog.key: "catalog.key"})
        if kind in ("manifest", "parquet_bytes"):
            first = ingest.list_tables(cfg.input.paths(), cfg.storage, tuple(ingest.TABLE_SUFFIXES))[0]
            names = ingest.table_columns(first, cfg.storage)
            key, _ = input_key_column(cfg, kind, names)
            check_columns(names, {key: "catalog.input_key"})


def _mark_from(batch: pa.Table, flag: str) -> pa.Table:
    return batch.append_column(flag, pa.array([True] * len(batch), pa.bool_()))


def joins_after_pass(cfg: PipelineConfig, kind: str) -> bool:
    """Whether image rows meet the catalog on the narrow table, after the streaming pass: webdataset
    shards (a .tar.gz stream has no metadata to select on before it is read). Manifests and
    parquet inputs are selected before any image byte is read."""
    return kind == "webdataset"


def parquet_metadata(cfg: PipelineConfig) -> tuple[ray.data.Dataset, str, int]:
    """Rows of the parquet input without the image column (one task per row group, no
    image byte read), with their coordinates and ids (``stages.ids.parquet_row_ids``); the
    key column; and the number of rows (from the footers)."""
    files = ingest.list_tables(cfg.input.paths(), cfg.storage, (".parquet",))
    key = ingest.resolve_key_column(ingest.table_columns(files[0], cfg.storage), cfg.input)
    groups = ray.data.from_items([{"file": f} for f in files], override_num_blocks=max(1, min(len(files), 200)))
    groups = groups.map_batches(ingest.parquet_row_groups, batch_format="pyarrow",
                                fn_kwargs={"storage": cfg.storage}).materialize()
    n = int(groups.sum("rows") or 0) if groups.count() else 0
    rows = groups.map_batches(ingest.parquet_metadata_rows, batch_size=1, batch_format="pyarrow",
                              fn_kwargs={"storage": cfg.storage, "bytes_column": cfg.input.bytes_column,
                                         "max_cell_bytes": cfg.input.max_sidecar_bytes})
    rows = rows.map_batches(ids.parquet_row_ids, batch_format="pyarrow",
                            fn_kwargs={"key_column": key, "coordinates": (ingest.PQ_FILE, ingest.PQ_GROUP,
                                                                          ingest.PQ_ROW)})
    return rows, key, n


def selection_dataset(cfg: PipelineConfig, kind: str) -> ray.data.Dataset:
    """The flagged selection table: the catalog, or the manifest's rows (with ids)."""
    if cfg.catalog.path:
        rows = read_table([cfg.catalog.path], cfg).map_batches(
            sel.with_join_key, batch_format="pyarrow", fn_kwargs={"column": cfg.catalog.key})
        # A key on two catalog rows would join an image twice: one row per key is kept
        # (counted as duplicate_keys), before predicates and caps see the rows.
        parts = joins.shuffle_partitions(
            pipeline_ids.table_rows_estimate(ingest.list_tables([cfg.catalog.path], cfg.storage,
                                                                tuple(ingest.TABLE_SUFFIXES)), cfg.storage), 250_000)
        rows = joins.map_groups(rows.map_batches(ids.id_partition, batch_format="pyarrow",
                                                 fn_kwargs={"parts": parts, "column": sel.JOIN_KEY, "hashed": False}),
                                ids.ID_PART, sel.one_row_per_key, parts)
        rank_column = cfg.catalog.key
    elif kind == "parquet_bytes":  # its own metadata columns, read without the image column
        rows, rank_column, _ = parquet_metadata(cfg)
        rows = rows.map_batches(sel.with_join_key, batch_format="pyarrow", fn_kwargs={"column": rank_column})
    else:  # the manifest is its own catalog
        rows = read_table(cfg.input.paths(), cfg).map_batches(
            ingest.manifest_rows, batch_format="pyarrow",
            fn_kwargs={"uri_column": cfg.input.uri_column, "allowed_protocols": cfg.storage.allowed_protocols})
        rank_column = ID
    flagged = rows.map_batches(sel.mark_predicates, batch_format="pyarrow",
                               fn_kwargs={"preds": cfg.select.predicates(), "rank_column": rank_column})
    cap = cfg.select.max_per_taxon
    if cap:
        flagged = flagged.materialize()
        partitions = joins.shuffle_partitions(flagged.count(), 250_000)
        flagged = joins.map_groups(flagged, cap.column, sel.cap_group, partitions,
                                   {"column": cap.column, "cap": cap.max, "seed": cfg.run.seed})
    return flagged.map_batches(_mark_from, batch_format="pyarrow", fn_kwargs={"flag": sel.FROM_CATALOG})


def selected_key_filter(flagged: ray.data.Dataset) -> tuple:
    """A Bloom filter of the selected keys (1% false positives; ~1.2 bytes per key), for
    shard readers to skip unselected members unread. Built by streaming the keys."""
    bits, k = new_bloom(selection_counts(flagged)["selected"], 0.01)
    for batch in flagged.select_columns([sel.JOIN_KEY, sel.SELECTED]).iter_batches(batch_format="pyarrow",
                                                                                  batch_size=65536):
        bloom_add(bits, sel.selected_keys(batch), k)
    return bits, k


def selection_counts(flagged: ray.data.Dataset) -> dict:
    """Catalog rows (one per key), selected, unselected, and ``duplicate_keys``: catalog rows
    left out because another row had their key (each image joins one catalog row)."""
    rows = flagged.map_batches(sel.count_selection, batch_format="pyarrow").take_all()
    total, chosen = sum(r["rows"] for r in rows), sum(r["selected"] for r in rows)
    return {"catalog_rows": total, "selected": chosen, "unselected": total - chosen,
            "duplicate_keys": sum(r["duplicate_keys"] for r in rows)}


def _only_selected(batch: pa.Table) -> pa.Table:
    out = batch.filter(batch.column(sel.SELECTED))
    return out.drop_columns([c for c in (sel.SELECTED, sel.RANK_ID, sel.JOIN_KEY, sel.FROM_CATALOG, sel.KEY_COPIES)
                             if c in out.column_names])


def selected_rows(flagged: ray.data.Dataset) -> ray.data.Dataset:
    """Selection on the input's own table (manifest, parquet metadata): the selected rows."""
    return flagged.map_batches(_only_selected, batch_format="pyarrow")


def input_key_column(cfg: PipelineConfig, kind: str, names: list[str]) -> tuple[str, bool]:
    """The column of input rows that meets ``catalog.key`` (and whether to take its basename)."""
    if cfg.catalog.input_key:
        return cfg.catalog.input_key, False
    if kind == "webdataset":
        return "key", True
    if kind == "parquet_bytes":
        return ingest.resolve_key_column(names, cfg.input), False
    return cfg.catalog.key, False


def join_catalog(cfg: PipelineConfig, rows: ray.data.Dataset, flagged: ray.data.Dataset, key: str,
                 basename: bool) -> tuple[ray.data.Dataset, dict]:
    """Full outer join of input rows with the flagged catalog; returns the classified rows
    (materialized) and the join counts."""
    left = rows.map_batches(sel.with_join_key, batch_format="pyarrow", fn_kwargs={"column": key, "basename": basename})
    left = left.map_batches(_mark_from, batch_format="pyarrow", fn_kwargs={"flag": sel.FROM_INPUT}).materialize()
    left_names = set(left.schema().names)
    right = flagged.map_batches(
        lambda b: b.drop_columns([c for c in b.column_names if c in left_names and c != sel.JOIN_KEY]),
        batch_format="pyarrow").materialize()
    n = left.count() + right.count()
    joined = left.join(right, join_type="full_outer", num_partitions=joins.shuffle_partitions(n, 250_000),
                       on=(sel.JOIN_KEY,)).materialize()
    counts = joined.map_batches(sel.count_joined, batch_format="pyarrow").take_all()
    totals = {k: sum(c[k] for c in counts) for k in ("unselected", "not_in_catalog", "catalog_without_image")}
    return joined.map_batches(sel.classify_joined, batch_format="pyarrow"), totals
