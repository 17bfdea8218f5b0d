"""ingest: list the inputs and read their bytes (the first step of the streaming pass).

A folder, an S3 prefix, a manifest table, parquet with image bytes or webdataset shards
(``stages.ingest``, ``stages.listing``, ``stages.shards``: pure per-batch functions).
Every row is born here with its stable ``id``; a file that cannot be read becomes a reject
(stage ingest); files the listings pass over are counted (``input_skipped``)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.compute as pc
import ray

import manifests.schema as schema
import stages.shards
import stages.ingest as ingest
import stages.listing as listing
from manifests import io as mio
from manifests.config import PipelineConfig
from manifests.rejects import ensure_columns
from manifests.schema import Stage
from pipeline import catalog, ids, joins
from pipeline.rundir import map_batches, remote_kwargs
from pipeline.stage import Context, StageDef
from stages import ids as sids
from stages.kernels.bloom import bloom_contains


def listing_dir(cfg: PipelineConfig) -> str:
    """Where listings leave their reports of skipped files while the pass runs (summed
    into the pass's marker, ``counts.input_skipped``, then removed)."""
    fs, root = mio.filesystem(cfg.output, cfg.storage)
    return mio.to_uri(fs, mio.join(root, "stages", "ingest.listing"))


def _list_dir_rows(batch: pa.Table, storage, extensions, rows_per_block, report: str):
    for raw in batch.column("dir").to_pylist():
        d = os.fsdecode(raw)  # passed as bytes: a local folder name need not be UTF-8
        skipped = listing.Skipped()
        uris = ingest.list_prefix(d, storage, extensions, skipped)
        listing.write_skipped(report, d, skipped, storage)
        for i in range(0, len(uris), rows_per_block):
            yield ingest.uri_rows(uris[i : i + rows_per_block])


def _read_row_groups(block: pa.Table, **kw):
    """Metadata rows grouped by (file, row group) -> their images, one row group at a time
    (a task holds one row group's images, whatever the block's size)."""
    files, groups = block[ingest.PQ_FILE].to_pylist(), block[ingest.PQ_GROUP].to_pylist()
    start = 0
    for i in range(1, len(block) + 1):
        if i == len(block) or (files[i], groups[i]) != (files[start], groups[start]):
            yield ingest.parquet_selected_images(block.slice(start, i - start), **kw)
            start = i


def _read_shard_rows(batch: pa.Table, storage, extensions, rows_per_block, key_filter=None, limits=None):
    keep = None
    if key_filter is not None:
        bits, k = joins.resolve_ref(key_filter)

        def keep(key: str) -> bool:
            return bool(bloom_contains(bits, [key], k)[0])

    for shard in batch.column("shard").to_pylist():
        yield from stages.shards.iter_shard(shard, storage, extensions, rows_per_block, keep, limits)


def ingest_dataset(cfg: PipelineConfig, kind: str, flagged: ray.data.Dataset | None = None,
                   join_counts: dict | None = None) -> ray.data.Dataset:
    """Rows ``id, uri, image_bytes, stage, reason, detail`` + metadata, streamed.

    For a manifest, ``flagged`` (the select stage's output) narrows the rows before any
    object is fetched; ``join_counts`` receives the catalog join's counts. Files the
    listings pass over are reported in :func:`listing_dir` (the driver's listings here,
    the folder-listing tasks as they run)."""
    skipped = listing.Skipped()
    ds = _ingest_rows(cfg, kind, flagged, {} if join_counts is None else join_counts, skipped)
    listing.write_skipped(listing_dir(cfg), "<driver>", skipped, cfg.storage)
    return ds


def _ingest_rows(cfg: PipelineConfig, kind: str, flagged: ray.data.Dataset | None, join_counts: dict,
                 skipped: listing.Skipped) -> ray.data.Dataset:
    inp, storage = cfg.input, cfg.storage
    remote = remote_kwargs(cfg)
    if kind == "folder":
        files, dirs = [], []
        for root in inp.paths():
            f, d = ingest.split_listing(root, storage, inp.extensions, skipped)
            files += f
            dirs += d
        parts = []
        if files:
            parts.append(ray.data.from_arrow(ingest.uri_rows(files)))
        if dirs:
            items = [{"dir": os.fsencode(d)} for d in dirs]
            listed = ray.data.from_items(items, override_num_blocks=len(dirs)).map_batches(
                _list_dir_rows, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                fn_kwargs={"storage": storage, "extensions": inp.extensions, "rows_per_block": inp.rows_per_block,
                           "report": listing_dir(cfg)},
            )
            parts.append(listed)
        if not parts:
            return ray.data.from_arrow(ensure_columns(
                pa.table({schema.ID: pa.array([], pa.string()), schema.URI: pa.array([], pa.string()),
                          schema.BYTES: pa.array([], pa.binary())})))
        rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        rows = rows.repartition(target_num_rows_per_block=cfg.run.read_batch_size)
        return map_batches(rows, ingest.fetch_batch, cfg, batch_size=cfg.run.read_batch_size, batch_format="pyarrow",
                                fn_kwargs={"storage": storage, "max_bytes": cfg.validate_.max_bytes}, **remote)
    if kind == "manifest":
        if flagged is not None and not cfg.catalog.path:
            rows = catalog.selected_rows(flagged)  # the manifest was its own catalog
            n_rows = flagged.count()
        else:
            rows = catalog.read_table(inp.paths(), cfg).map_batches(
                ingest.manifest_rows, batch_format="pyarrow", batch_size=None,
                fn_kwargs={"uri_column": inp.uri_column, "allowed_protocols": storage.allowed_protocols})
            n_rows = ids.table_rows_estimate(ingest.list_tables(inp.paths(), storage, tuple(ingest.TABLE_SUFFIXES), skipped),
                                             storage)
            if flagged is not None:
                key, base = catalog.input_key_column(cfg, kind, rows.schema().names)
                rows, counts = catalog.join_catalog(cfg, rows, flagged, key, base)
                join_counts.update(counts)
        rows = ids.unique_ids(rows, n_rows)  # a uri listed twice: two rows, two ids (materialized)
        rows = rows.repartition(target_num_rows_per_block=cfg.run.read_batch_size)
        return map_batches(rows, ingest.fetch_batch, cfg, batch_size=cfg.run.read_batch_size, batch_format="pyarrow",
                                fn_kwargs={"storage": storage, "max_bytes": cfg.validate_.max_bytes}, **remote)
    if kind == "parquet_bytes":
        # Metadata first (footers and metadata columns, no image byte), ids made unique
        # there (a repeated or null key), then the image column of each row group, one row
        # group per call, only for the rows chosen.
        files = ingest.list_tables(inp.paths(), storage, (".parquet",), skipped)
        key = ingest.resolve_key_column(ingest.table_columns(files[0], storage), inp)
        regroup = flagged is not None  # selected or joined rows come shuffled; plain metadata does not
        if flagged is not None and not cfg.catalog.path:
            chosen, n_rows = catalog.selected_rows(flagged), flagged.count()
        else:
            chosen, _, n_rows = catalog.parquet_metadata(cfg)
            if flagged is not None:
                chosen, counts = catalog.join_catalog(cfg, chosen, flagged, cfg.catalog.input_key or key, False)
                join_counts.update(counts)
        chosen = ids.unique_ids(chosen, n_rows, (ingest.PQ_FILE, ingest.PQ_GROUP, ingest.PQ_ROW), sids.ROW_ID)
        grouped = ids.by_row_group(chosen, n_rows, regroup)  # materialized: no shuffle in the streaming pass
        return map_batches(
            grouped, _read_row_groups, cfg, batch_format="pyarrow", batch_size=None,
            fn_kwargs={"storage": storage, "bytes_column": inp.bytes_column, "key_column": key,
                       "max_bytes": cfg.validate_.max_bytes}, **remote)
    if kind == "webdataset":
        shards = ingest.list_shards(inp.paths(), storage, skipped)
        src = ray.data.from_items([{"shard": s} for s in shards], override_num_blocks=max(1, len(shards)))
        key_filter = None
        if flagged is not None:  # members whose key is surely unselected are skipped unread
            key_filter = ray.put(catalog.selected_key_filter(flagged))
        return src.map_batches(
            _read_shard_rows, batch_size=1, batch_format="pyarrow", num_cpus=1,
            fn_kwargs={"storage": storage, "extensions": inp.extensions, "rows_per_block": inp.rows_per_block,
                       "key_filter": key_filter, "limits": stages.shards.ReadLimits.of(cfg)},
        )
    raise ValueError(f"input.kind: unknown kind {kind!r}")


def _skipped_into(counts: dict, rd, folder: str):
    """Drop the reports an interrupted pass left in ``folder``; returns the call that,
    once the pass has run, sums the new ones into ``counts["input_skipped"]``, so the
    pass's marker keeps them (``--resume`` reads them from there)."""
    _, path = mio.filesystem(folder, rd.cfg.storage)
    if rd.fs.exists(path):
        rd.fs.rm(path, recursive=True)
    return lambda: counts.update(input_skipped=listing.collect_skipped(folder, rd.cfg.storage))


def _drop_bytes(batch: pa.Table) -> pa.Table:
    blobs = batch.column(schema.BYTES)
    n_bytes = pc.binary_length(blobs).cast(pa.int64())
    return batch.drop_columns([schema.BYTES]).append_column("n_bytes", n_bytes)


def _stream(ctx: Context, ds) -> ray.data.Dataset:
    """Rows ``id, uri, image_bytes, stage, reason, detail`` + metadata (without the bytes
    when the pass stops here: ``--until ingest``)."""
    cfg, counts = ctx.cfg, ctx.counts.setdefault(ctx.facts["pass"], {})
    flagged = ctx.read("select") if "select" in ctx.fingerprints else None
    join_counts: dict = {}
    ctx.facts.setdefault("before_commit", []).append(_skipped_into(counts, ctx.rd, listing_dir(cfg)))
    out = ingest_dataset(cfg, ctx.kind, flagged, join_counts)
    ctx.facts["join_counts"] = join_counts  # filled as the pass runs
    ctx.facts["before_commit"].append(lambda: join_counts and counts.update(join=join_counts))
    if not ctx.runs(Stage.VALIDATE):
        out = out.map_batches(_drop_bytes, batch_format="pyarrow", batch_size=cfg.run.batch_size)
    return out


def _summary(ctx: Context) -> dict:
    got = ctx.marker_counts(ctx.facts["pass"]).get("input_skipped")
    return {"input_kind": ctx.kind, "input_skipped": got or listing.Skipped().to_dict()}


def _describe(ctx: Context) -> str:
    return f"ingest[{ctx.kind}] {ctx.cfg.input.paths()}  map_batches(num_cpus=1)"


STAGE = StageDef(
    name=Stage.INGEST, module=__name__, sections=("input", "storage.on_transient_exhausted", "validate.max_bytes"),
    doc="List the inputs (folder, S3 prefix, manifest table, parquet with bytes, webdataset shards) and read "
        "their bytes, bounded and retried; unreadable inputs become rejects",
    resources="CPU tasks (threads for remote reads), streamed",
    stream=_stream, summary=_summary, describe=_describe)
