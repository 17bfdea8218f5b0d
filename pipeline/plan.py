"""The Ray Data plan: one streaming pass (ingest -> validate) that writes the narrow table,
then global steps on it, then the committed manifest.

Only this package imports ``ray``. Stage outputs live in ``<output>/stages/<name>/`` with a
``_SUCCESS`` marker holding the stage fingerprint = hash(config section, code of the stage,
upstream fingerprint); ``--resume`` reuses a stage only when its fingerprint matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pyarrow.compute as pc
import ray

import manifests.schema as schema
import stages.aesthetic
import stages.backbones
import stages.exact_dedup
import stages.deadline
import stages.embed
import stages.filters
import stages.kernels.quality
import stages.ingest as ingest
import stages.listing as listing
import stages.shards
import stages.kernels.bloom
import stages.kernels.examples
import stages.kernels.exact_dedup
import stages.kernels.kmeans
import stages.kernels.near_dedup
import stages.near_dedup
import stages.sample
import stages.kernels.sampling
import stages.kernels.hashing
import stages.kernels.phash
import stages.kernels.select
import stages.select
import stages.validate
from manifests import io as mio
from pipeline import __version__, catalog, embedding
from pipeline import examples as bank_examples
from pipeline import ids, joins, neardedup, refresh, sampling
from manifests.config import STAGES, PipelineConfig
from stages import ids as sids
from stages.kernels.bloom import bloom_contains
from stages.validate import ValidateStage

log = logging.getLogger("biocurate")
REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- fingerprints

def code_hash(*modules: ModuleType) -> str:
    h = hashlib.sha256(__version__.encode())
    for m in modules:
        h.update(Path(m.__file__).read_bytes())
    return h.hexdigest()[:16]


def fingerprint(section: object, code: str, upstream: str = "") -> str:
    blob = json.dumps({"section": section, "code": code, "upstream": upstream}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def selecting(cfg: PipelineConfig) -> bool:
    """Whether a select stage runs (a catalog to join, or predicates/caps to apply)."""
    return bool(cfg.catalog.path) or cfg.select.active


def embedding_on(cfg: PipelineConfig, until: str) -> bool:
    return bool(cfg.embed.models) and STAGES.index(until) >= STAGES.index("embed")


def _models_section(plans: list) -> list[dict]:
    return [{"model_id": p.model_id, "prep": p.prep, "dtype": p.dtype} for p in plans]


def validate_fingerprint(cfg: PipelineConfig) -> str:
    """What validation depends on (settings and code): a refresh copies a previous run's
    validation only when this matches."""
    return fingerprint(cfg.section("validate"), code_hash(stages.validate, stages.deadline, stages.kernels.phash,
                                                           stages.kernels.quality))


def refresh_fingerprint(cfg: PipelineConfig, prev) -> str:
    if prev is None:
        return ""
    return fingerprint({"refresh": cfg.section("refresh"), "previous": prev.summary.get("fingerprints"),
                        "finished": (prev.summary.get("timings_s") or {}).get("total")}, "")


def stage_fingerprints(cfg: PipelineConfig, until: str, kind: str = "folder",
                       plans: list | None = None, examples_fp: str = "", references_fp: str = "",
                       refresh_fp: str = "") -> dict[str, str]:
    """Fingerprint of each stage the run will execute, in order. ``plans``: the resolved
    embedding models (``embedding.model_plans``) when the embed stage runs; ``refresh_fp``:
    the previous run of a refresh."""
    validating = STAGES.index(until) >= STAGES.index("validate")
    plans = plans if embedding_on(cfg, until) else []
    scan_section = {
        "input": cfg.section("input"),
        "on_transient_exhausted": cfg.storage.on_transient_exhausted,
        "validate": cfg.section("validate") if validating else None,
        "models": _models_section(plans or []),
        "refresh": refresh_fp,
    }
    scan_code = code_hash(ingest, listing, stages.shards, schema, stages.kernels.hashing, sids, ids, sys.modules[__name__],
                          *((stages.validate, stages.deadline, stages.kernels.phash, stages.kernels.quality)
                            if validating else ()),
                          *((stages.embed, stages.backbones, embedding) if plans else ()))
    fps: dict[str, str] = {}
    select_code = code_hash(stages.select, stages.kernels.select, stages.kernels.bloom, catalog)
    select_section = {"select": cfg.section("select"), "catalog": cfg.section("catalog"), "seed": cfg.run.seed,
                      "input": cfg.section("input")}
    if selecting(cfg):
        fps["select"] = fingerprint(select_section, select_code)
    fps["scan"] = fingerprint(scan_section, scan_code, fps.get("select", ""))
    if selecting(cfg) and catalog.joins_after_scan(cfg, kind):
        fps["catalog_join"] = fingerprint(select_section, select_code, fps["scan"])
    narrow_fp = fps.get("catalog_join", fps["scan"])
    for p in plans or []:
        fps[embed_stage(p)] = fingerprint({"model": _models_section([p]), "cache": cfg.embed.cache},
                                          code_hash(stages.embed, embedding), narrow_fp)
    if STAGES.index(until) >= STAGES.index("exact_dedup") and cfg.exact_dedup.enabled:
        fps["exact_dedup"] = fingerprint(
            {"exact_dedup": cfg.section("exact_dedup"), "seed": cfg.run.seed},
            code_hash(stages.exact_dedup, stages.kernels.exact_dedup),
            fps.get("catalog_join", fps["scan"]),
        )
    if STAGES.index(until) >= STAGES.index("filter"):
        examples = {k: v for k, v in cfg.section("examples").items() if k != "labels"}  # labels: report only
        fps["filter"] = fingerprint({"quality": cfg.section("quality"), "examples": examples,
                                     "aesthetic": cfg.section("aesthetic"), "bank": examples_fp},
                                    code_hash(stages.filters, stages.kernels.examples, bank_examples,
                                              stages.aesthetic),
                                    fps.get("exact_dedup", narrow_fp))
    if STAGES.index(until) >= STAGES.index("near_dedup") and cfg.near_dedup.enabled:
        dedup_model = cfg.embed.model_for("dedup") if plans else None
        embed_fp = next((fps[embed_stage(p)] for p in plans or [] if p.name == dedup_model), "")
        fps["near_dedup"] = fingerprint({"near_dedup": cfg.section("near_dedup"), "seed": cfg.run.seed,
                                         "model": dedup_model, "references": references_fp,
                                         "refresh": refresh_fp},
                                        code_hash(stages.near_dedup, stages.kernels.near_dedup, stages.kernels.kmeans,
                                                  neardedup),
                                        fps.get("filter", fps.get("exact_dedup", narrow_fp)) + embed_fp)
    if STAGES.index(until) >= STAGES.index("sample") and cfg.sample.active and plans:
        sample_model = cfg.embed.model_for("sample")
        embed_fp = next((fps[embed_stage(p)] for p in plans if p.name == sample_model), "")
        fps["sample"] = fingerprint({"sample": cfg.section("sample"), "seed": cfg.run.seed, "model": sample_model,
                                     "refresh": refresh_fp},
                                    code_hash(stages.sample, stages.kernels.sampling, stages.kernels.kmeans, sampling),
                                    fps.get("near_dedup", fps.get("filter", fps.get("exact_dedup", narrow_fp)))
                                    + embed_fp)
    return fps


# --------------------------------------------------------------------------- ray

IDLE_WORKER_MS = 600_000


def init_ray(cfg: PipelineConfig) -> None:
    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, log_to_driver=True)
    else:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        # Idle workers are kept (Ray's default kills them after 1 s once there are more
        # than CPUs): every global step is a few short Ray Data executions, and a fresh
        # worker process pays seconds of imports (torch) before its first task.
        ray.init(num_cpus=cfg.run.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False, _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_MS})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.run.progress_bars
    ctx.print_on_execution_start = False
    if not cfg.run.progress_bars:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Global steps group narrow rows by key; the plain hash shuffle starts far faster than
    # the default (v2) on small and medium tables and keeps memory bounded per partition.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
    # Ray 2.60's parquet reader (datasource V2) starts 32 footer-reader actors for every
    # read_parquet: every stage reads its upstream table, so on a small node that was
    # minutes of process start-up per run (a 30-row filter stage took 2 min). The V1 reader
    # reads footers in its read tasks.
    ctx.use_datasource_v2 = False
    # An embedding actor's call is idempotent (its output, and the cache file it adds, are
    # the same when repeated): retry it on I/O errors too, not only when its process died.
    ctx.actor_task_retry_on_errors = [OSError]


def embed_stage(plan) -> str:
    """Stage (and folder) name of one model's embedding table."""
    return f"embed_{stages.embed.slug(plan.name)}"


def _ray_remote_kwargs(cfg: PipelineConfig) -> dict:
    kw: dict = {"num_cpus": 1, "max_retries": cfg.run.max_task_retries}
    if cfg.run.concurrency:
        kw["concurrency"] = cfg.run.concurrency
    return kw


# --------------------------------------------------------------------------- streaming pass

def listing_dir(cfg: PipelineConfig) -> str:
    """Where listings leave their reports of skipped files while the scan runs (summed
    into the scan stage's marker, ``counts.input_skipped``, then removed)."""
    fs, root = mio.filesystem(cfg.output, cfg.storage)
    return mio.to_uri(fs, mio.join(root, "stages", "scan_listing"))


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
    remote = _ray_remote_kwargs(cfg)
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
            return ray.data.from_arrow(ingest.with_reject_columns(
                pa.table({schema.ID: pa.array([], pa.string()), schema.URI: pa.array([], pa.string()),
                          schema.BYTES: pa.array([], pa.binary())}), []))
        rows = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
        rows = rows.repartition(target_num_rows_per_block=cfg.run.read_batch_size)
        return rows.map_batches(ingest.fetch_batch, batch_size=cfg.run.read_batch_size, batch_format="pyarrow",
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
        return rows.map_batches(ingest.fetch_batch, batch_size=cfg.run.read_batch_size, batch_format="pyarrow",
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
        return grouped.map_batches(
            _read_row_groups, batch_format="pyarrow", batch_size=None,
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


def _skipped_into(counts: dict, rd: "RunDir", folder: str):
    """Drop the reports an interrupted scan left in ``folder``; returns the call that,
    once the scan has run, sums the new ones into ``counts["input_skipped"]``, so the
    scan stage's marker keeps them (``--resume`` reads them from there)."""
    _, path = mio.filesystem(folder, rd.cfg.storage)
    if rd.fs.exists(path):
        rd.fs.rm(path, recursive=True)
    return lambda: counts.update(input_skipped=listing.collect_skipped(folder, rd.cfg.storage))


def _drop_bytes(batch: pa.Table) -> pa.Table:
    blobs = batch.column(schema.BYTES)
    n_bytes = pc.binary_length(blobs).cast(pa.int64())
    return batch.drop_columns([schema.BYTES]).append_column("n_bytes", n_bytes)


def scan_dataset(cfg: PipelineConfig, kind: str, until: str, flagged: ray.data.Dataset | None = None,
                 join_counts: dict | None = None, models: tuple | None = None, reuse=None) -> ray.data.Dataset:
    """The streaming pass. Output: the narrow table (never pixels). ``models``:
    (plans, device, known sets) when the embedding actors run in the pass. ``reuse``: an
    object ref of sha256 keys not to decode (a refresh; rows get a ``_reused`` flag)."""
    ds = ingest_dataset(cfg, kind, flagged, join_counts)
    if models and models[0]:
        return embedding.embed_in_pass(cfg, ds, *models, reuse=reuse)
    if STAGES.index(until) >= STAGES.index("validate"):
        return ds.map_batches(ValidateStage(cfg.validate_, reuse=reuse), batch_size=cfg.run.batch_size,
                              batch_format="pyarrow", **_ray_remote_kwargs(cfg))
    return ds.map_batches(_drop_bytes, batch_format="pyarrow", batch_size=cfg.run.batch_size)


# --------------------------------------------------------------------------- run directory

def _compact(batch: pa.Table) -> pa.Table:
    return batch.combine_chunks()


def write_parquet_dir(ds: ray.data.Dataset, fs, tmp: str) -> None:
    """Write ``ds`` as parquet files under ``tmp`` (an empty dataset: one empty file with
    its schema, so readers still see the columns)."""
    fs.makedirs(tmp, exist_ok=True)
    # On S3 a "folder" exists only once an object is in it: without one, Ray Data thinks it
    # created the folder and, when no row was written, fails deleting it.
    keep = mio.join(tmp, ".writing")
    fs.pipe(keep, b"")
    # One chunk per column before writing: parquet gets a row group per chunk, and a block
    # assembled from many small tables (map_groups: one per group) would be written as
    # thousands of one-row groups that every later read pays for.
    ds.map_batches(_compact, batch_format="pyarrow", batch_size=None).write_parquet(
        tmp, filesystem=mio.arrow_filesystem(fs))
    fs.rm(keep)
    fs.invalidate_cache(tmp)
    try:
        written = fs.find(tmp)
    except FileNotFoundError:  # S3: nothing was written under the prefix
        written = []
    if not any(p.endswith(".parquet") for p in written):
        import pyarrow.parquet as pq

        found = ds.schema()
        empty_schema = found.base_schema if found is not None else schema.EMPTY_NARROW
        with fs.open(mio.join(tmp, "empty.parquet"), "wb") as f:
            pq.write_table(empty_schema.empty_table(), f)


@dataclass
class RunDir:
    cfg: PipelineConfig
    fs: object = field(init=False)
    root: str = field(init=False)

    def __post_init__(self):
        self.fs, self.root = mio.filesystem(self.cfg.output, self.cfg.storage)
        self.afs = mio.arrow_filesystem(self.fs)

    def path(self, *parts: str) -> str:
        return mio.join(self.root, *parts)

    def stage_done(self, name: str, fp: str) -> bool:
        marker = mio.read_marker(self.fs, self.path("stages", name))
        return bool(marker) and marker.get("fingerprint") == fp

    def write(self, ds: ray.data.Dataset, final: str, marker: dict, before_commit=None) -> None:
        """Write ``ds`` as parquet under a temporary name, then commit it (marker last).
        ``before_commit()``: called once ``ds`` has run, before the marker is written."""
        tmp = mio.temp_path(self.fs, final)
        write_parquet_dir(ds, self.fs, tmp)
        if before_commit is not None:
            before_commit()
        mio.commit(self.fs, tmp, final, marker)

    def read(self, final: str) -> ray.data.Dataset:
        if not mio.is_committed(self.fs, final):
            raise FileNotFoundError(f"{final} is not committed")
        files = sorted(p for p in self.fs.find(final) if p.endswith(".parquet"))
        return ray.data.read_parquet(files, filesystem=self.afs)


# --------------------------------------------------------------------------- global steps

def _has_sha(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["sha256"]))


def _no_sha(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(pc.is_valid(batch["sha256"])))


def _with_duplicate_of(batch: pa.Table) -> pa.Table:
    if "duplicate_of" in batch.column_names:
        return batch
    return batch.append_column("duplicate_of", pa.nulls(len(batch), pa.string()))


def exact_dedup_dataset(cfg: PipelineConfig, narrow: ray.data.Dataset) -> ray.data.Dataset:
    hashed = narrow.map_batches(_has_sha, batch_format="pyarrow").materialize()
    unhashed = narrow.map_batches(_no_sha, batch_format="pyarrow").map_batches(_with_duplicate_of,
                                                                              batch_format="pyarrow")
    n = hashed.count()
    if n == 0:  # nothing to group (and Ray's shuffle needs a schema to sort an empty partition)
        return hashed.map_batches(_with_duplicate_of, batch_format="pyarrow").union(unhashed)
    # Hash-shuffle partitions: ~250k narrow rows each (a few tens of MB), at most 200. Rows
    # are grouped by a partition of their sha256 (every copy of one hash lands in the same
    # one), and each call decides a whole partition: one call per sha256 would be a Python
    # call and a one-row block per distinct image.
    partitions = joins.shuffle_partitions(n, 250_000)
    decided = hashed.map_batches(_sha_partition, batch_format="pyarrow", fn_kwargs={"parts": partitions}).groupby(
        "_xpart", num_partitions=partitions).map_groups(
        _exact_dedup_partition, batch_format="pyarrow", fn_kwargs={"cfg": cfg.exact_dedup, "seed": cfg.run.seed})
    return decided.union(unhashed)


def _sha_partition(batch: pa.Table, parts: int) -> pa.Table:
    head = pc.utf8_slice_codeunits(batch["sha256"], 0, 8).to_pylist()
    return batch.append_column("_xpart", pa.array([int(h, 16) % parts for h in head], pa.int32()))


def _exact_dedup_partition(batch: pa.Table, cfg, seed: int) -> pa.Table:
    return stages.exact_dedup.exact_dedup_batch(batch.drop_columns(["_xpart"]), cfg, seed)


def with_embeddings(rd: "RunDir", narrow: ray.data.Dataset, plans: list, name: str) -> ray.data.Dataset:
    """``narrow`` with model ``name``'s ``embedding`` column, joined by id (null for rows
    that have none: rejected before the embedding stage)."""
    plan = next(p for p in plans if p.name == name)
    embs = rd.read(rd.path("stages", embed_stage(plan))).select_columns(["id", "embedding"])
    return joins.join(narrow, embs, "id", "left_outer", rd.cfg.run.broadcast_join_mb)


def nonnatural_dataset(cfg: PipelineConfig, rd: "RunDir", narrow: ray.data.Dataset, plans: list, device: str,
                       bank_rows: pa.Table) -> tuple[ray.data.Dataset, dict]:
    """Embed the example bank with the filter model and fit it, join the filter model's
    embeddings to the narrow rows by id, decide per row. Returns the rows and the report."""
    plan = next(p for p in plans if p.name == cfg.embed.model_for("filter"))
    bank, counts = bank_examples.embed_bank(cfg, bank_rows, plan, device)
    model, report = bank_examples.fit(cfg, bank)
    report.update({"examples_rejected": counts["examples_rejected"], "model_id": plan.model_id,
                   "bank_embeddings": {"computed": counts["computed"], "cached": counts["cached"]}})
    joined = with_embeddings(rd, narrow, plans, plan.name)
    return joined.map_batches(stages.filters.nonnatural_decisions, batch_format="pyarrow",
                              fn_kwargs={"model": model}), report


# --------------------------------------------------------------------------- manifest

def _alive(batch: pa.Table) -> pa.Table:
    kept = batch.filter(pc.invert(pc.is_valid(batch["reason"])))
    return kept.drop_columns([c for c in ("stage", "reason", "detail", "duplicate_of") if c in kept.column_names])


def _dead(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["reason"]))


def _reason_counts(batch: pa.Table) -> pa.Table:
    # A plain Counter: pyarrow's threaded group_by has failed inside Ray workers
    # ("thread index out of range").
    counts = Counter(zip(batch["stage"].to_pylist(), batch["reason"].to_pylist()))
    keys = sorted(counts, key=lambda k: (k[0] or "", k[1] or ""))
    return pa.table({"stage": pa.array([k[0] for k in keys], pa.string()),
                     "reason": pa.array([k[1] for k in keys], pa.string()),
                     "n": pa.array([counts[k] for k in keys], pa.int64())})


def count_reasons(ds: ray.data.Dataset) -> dict:
    """``{"curated": n, "rejected": {stage: {reason: n}}}`` over a decided narrow table."""
    rows = ds.select_columns(["stage", "reason"]).map_batches(_reason_counts, batch_format="pyarrow").take_all()
    curated, rejected = 0, {}
    for r in rows:
        if r["reason"] is None:
            curated += r["n"]
        else:
            by = rejected.setdefault(r["stage"], {})
            by[r["reason"]] = by.get(r["reason"], 0) + r["n"]
    return {"curated": curated, "rejected": {s: dict(sorted(v.items())) for s, v in sorted(rejected.items())}}


def versions() -> dict:
    import importlib.metadata as md

    out = {"biocurate": __version__, "python": sys.version.split()[0]}
    for pkg in ("ray", "torch", "pyarrow", "pillow", "s3fs"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def describe(cfg: PipelineConfig, kind: str, until: str, plans: list | None = None, device: str = "cpu") -> str:
    lines = [f"biocurate {__version__}: {kind} input {cfg.input.paths()} -> {cfg.output} (until {until})"]
    lines.append(f"  scan        ingest[{kind}] -> validate   map_batches(num_cpus=1, batch_size={cfg.run.batch_size}, "
                 f"concurrency={cfg.run.concurrency or 'auto'})  writes stages/scan (narrow table)")
    for p in plans or []:
        lines.append(f"  embed       {p.model_id} ({p.spec.size}px, {p.spec.dim}-d {p.dtype}) on {device}: actors "
                     f"concurrency={cfg.embed.concurrency} batch_size={cfg.embed.batch_size}  writes stages/{embed_stage(p)}")
    if STAGES.index(until) >= STAGES.index("exact_dedup") and cfg.exact_dedup.enabled:
        lines.append(f"  exact_dedup groupby(sha256).map_groups  placeholder_min_copies="
                     f"{cfg.exact_dedup.placeholder_min_copies}  writes stages/exact_dedup")
    if STAGES.index(until) >= STAGES.index("filter"):
        on = {k: v for k, v in cfg.section("quality").items() if v is not None}
        lines.append(f"  filter      quality thresholds {on or 'none'}  writes stages/filter")
    if STAGES.index(until) >= STAGES.index("near_dedup") and cfg.near_dedup.enabled:
        nd = cfg.near_dedup
        lines.append(f"  near_dedup  perceptual={nd.perceptual} (Hamming <= {nd.max_hamming}), semantic={nd.semantic} "
                     f"(model {cfg.embed.model_for('dedup') if plans else None}), union-find  writes stages/near_dedup")
    if STAGES.index(until) >= STAGES.index("sample") and cfg.sample.active and plans:
        sc = cfg.sample
        lines.append(f"  sample      hierarchical k-means {sc.levels or 'auto levels'} ({sc.method}) on "
                     f"{cfg.embed.model_for('sample')}, target {sc.target or sc.fraction}, pick {sc.pick}  "
                     "writes stages/sample")
    lines.append("  manifest    curated/ + rejected/ + summary.json, committed with _SUCCESS")
    return "\n".join(lines)


def run(cfg: PipelineConfig, until: str = STAGES[-1], resume: bool = False, kind: str | None = None) -> dict:
    """Execute the plan; returns the summary (also written to ``<output>/summary.json``).
    ``kind``: the input kind when already detected (``run.check_inputs``), else detected here."""
    t_start = time.time()
    kind = kind or ingest.detect_kind(cfg.input, cfg.storage)
    prev = refresh.load_previous(cfg)
    cfg = refresh.with_previous_cache(cfg, prev)
    plans = embedding.model_plans(cfg) if embedding_on(cfg, until) else []
    init_ray(cfg)
    device = embedding.resolve_device(cfg) if plans else "cpu"
    print(describe(cfg, kind, until, plans, device), flush=True)
    rd = RunDir(cfg)
    filtering_examples = bool(cfg.examples.path) and bool(plans) and STAGES.index(until) >= STAGES.index("filter")
    bank_rows = bank_examples.bank_rows(cfg) if filtering_examples else None
    examples_fp = bank_examples.listing_hash(bank_rows) if filtering_examples else ""
    scoring_aesthetic = (STAGES.index(until) >= STAGES.index("filter")) and embedding.aesthetic_active(cfg, plans)
    refs_fp = (neardedup.references_fingerprint(cfg)
               if cfg.near_dedup.enabled and STAGES.index(until) >= STAGES.index("near_dedup") else "")
    refresh_fp = refresh_fingerprint(cfg, prev)
    fps = stage_fingerprints(cfg, until, kind, plans, examples_fp + f"|aesthetic={scoring_aesthetic}", refs_fp,
                             refresh_fp)
    validate_fp = validate_fingerprint(cfg)
    refresh_report: dict = {}
    by_stage = {embed_stage(p): p for p in plans}
    timings, reused = {}, []

    # Whatever a previous run committed at the top is stale from here on: drop its markers
    # first so an interrupted run never leaves a manifest that looks complete.
    for marker in (rd.path(mio.SUCCESS), rd.path("curated", mio.SUCCESS), rd.path("rejected", mio.SUCCESS)):
        if rd.fs.exists(marker):
            rd.fs.rm(marker)

    upstream = None
    for name, fp in fps.items():
        final = rd.path("stages", name)
        if resume and rd.stage_done(name, fp):
            reused.append(name)
            upstream = final if name != "select" and name not in by_stage else upstream
            log.info("stage %s: fingerprint %s matches, reused", name, fp)
            continue
        t0 = time.time()
        stage_counts: dict = {}
        before_commit = None
        if name == "select":
            ds = catalog.selection_dataset(cfg, kind).materialize()
            stage_counts = catalog.selection_counts(ds)
        elif name == "scan":
            flagged = rd.read(rd.path("stages", "select")) if "select" in fps else None
            known = embedding.known_sets(cfg, plans) if plans and cfg.embed.cache else {}
            reuse = None
            if prev is not None and STAGES.index(until) >= STAGES.index("validate"):
                why = ("refresh.reuse_validation is off" if not cfg.refresh.reuse_validation else
                       "the previous run's validate settings or code differ"
                       if not refresh.validate_fingerprint_matches(prev, validate_fp) else
                       "embeddings are off but the previous run's were on" if plans and not cfg.embed.cache else None)
                if why is None:
                    reuse = refresh.reuse_plan(prev, known)
                stage_counts["refresh"] = {"validation_reused": why is None, "why_not": why}
            before_commit = _skipped_into(stage_counts, rd, listing_dir(cfg))
            ds = scan_dataset(cfg, kind, until, flagged, stage_counts, (plans, device, known),
                              ray.put(reuse.keys) if reuse is not None else None)
            if reuse is not None:  # the pass first, then copy the previous validation into its reused rows
                passed = rd.path("stages", "scan_pass")
                rd.write(ds, passed, {"fingerprint": fp})
                ds, n_reused = refresh.fill_reused(rd.read(passed), reuse, cfg.run.broadcast_join_mb)
                stage_counts["refresh"]["rows_not_decoded"] = n_reused
        elif name == "catalog_join":
            narrow = rd.read(upstream)
            key, base = catalog.input_key_column(cfg, kind, narrow.schema().names)
            ds, stage_counts = catalog.join_catalog(cfg, narrow, rd.read(rd.path("stages", "select")), key, base)
        elif name in by_stage:
            ds, stage_counts = embedding.resolve_embeddings(cfg, rd.read(upstream), by_stage[name])
        elif name == "exact_dedup":
            ds = exact_dedup_dataset(cfg, rd.read(upstream).map_batches(embedding.drop_embeddings,
                                                                       batch_format="pyarrow"))
        elif name == "filter":
            ds = (rd.read(upstream).map_batches(embedding.drop_embeddings, batch_format="pyarrow")
                  .map_batches(stages.filters.quality_decisions, batch_format="pyarrow",
                               fn_kwargs={"cfg": cfg.quality}))
            if filtering_examples:
                ds, stage_counts = nonnatural_dataset(cfg, rd, ds, plans, device, bank_rows)
            if scoring_aesthetic:
                ds = with_embeddings(rd, ds, plans, cfg.embed.model_for("aesthetic")).map_batches(
                    stages.filters.aesthetic_decisions, batch_format="pyarrow",
                    fn_kwargs={"head": cfg.aesthetic.head, "weights": cfg.aesthetic.weights,
                               "min_score": cfg.aesthetic.min_score})
        elif name == "near_dedup":
            model = cfg.embed.model_for("dedup") if plans else None
            dplan = next((p for p in plans if p.name == model), None)
            embs = flips = None
            if dplan is not None and cfg.near_dedup.semantic:
                embs = rd.read(rd.path("stages", embed_stage(dplan))).select_columns(["id", "embedding"])
                fplan = next((p for p in plans if p.flip and p.spec.name == dplan.name), None)
                if fplan is not None:
                    flips = rd.read(rd.path("stages", embed_stage(fplan))).select_columns(["id", "embedding"])
            prior = refresh.prior_keys(prev) if prev is not None else None
            ds, stage_counts, pairs = neardedup.near_dedup_dataset(cfg, rd.read(upstream), embs, dplan, device,
                                                                   prior, flips)
            centre = stage_counts.pop("_centre", None)
            rd.write(ray.data.from_arrow(pairs), rd.path("stages", "near_dedup_pairs"), {"fingerprint": fp})
            if centre is not None:  # the mean subtracted before the semantic cosine (dedup-report recomputes pairs)
                rd.write(ray.data.from_arrow(pa.table({"model_id": [dplan.model_id], "mean": [centre.tolist()]})),
                         rd.path("stages", "near_dedup_centre"), {"fingerprint": fp})
        elif name == "sample":
            splan = next(p for p in plans if p.name == cfg.embed.model_for("sample"))
            embs = rd.read(rd.path("stages", embed_stage(splan))).select_columns(["id", "embedding"])
            levels, why = refresh.previous_levels(cfg, prev, splan.model_id) if prev is not None else (None, None)
            ds, stage_counts, centroids = sampling.sample_dataset(cfg, rd.read(upstream), embs, splan.name, device,
                                                                  levels)
            if prev is not None:
                stage_counts["previous_centroids"] = why
            if centroids is not None:
                rd.write(ray.data.from_arrow(centroids), rd.path("stages", "sample_centroids"),
                         {"fingerprint": fp, "model_id": splan.model_id})
        else:  # pragma: no cover - guarded by stage_fingerprints
            raise AssertionError(name)
        rd.write(ds, final, {"fingerprint": fp, "stage": name, "counts": stage_counts}, before_commit)
        if name == "scan" and rd.fs.exists(rd.path("stages", "scan_pass")):
            rd.fs.rm(rd.path("stages", "scan_pass"), recursive=True)
        timings[name] = round(time.time() - t0, 3)
        if name != "select" and name not in by_stage:
            upstream = final

    t0 = time.time()
    decided = (rd.read(upstream).map_batches(embedding.drop_embeddings, batch_format="pyarrow")
               .map_batches(_with_duplicate_of, batch_format="pyarrow").materialize())
    staging = rd.path(f".staging-{int(t_start)}")
    repeats = ids.count_repeats(decided)  # rows whose source repeated a name (given an ordinal id)
    decided = decided.map_batches(ids.drop_repeat, batch_format="pyarrow")
    rd.write(decided.map_batches(_alive, batch_format="pyarrow"), mio.join(staging, "curated"), {})
    rd.write(decided.map_batches(_dead, batch_format="pyarrow"), mio.join(staging, "rejected"), {})
    counts = count_reasons(decided)
    for part in ("curated", "rejected"):
        mio.commit(rd.fs, mio.join(staging, part), rd.path(part), {"fingerprints": fps})
    if rd.fs.exists(staging):  # S3 has no empty folders: nothing may be left to remove
        rd.fs.rm(staging, recursive=True)
    timings["manifest"] = round(time.time() - t0, 3)
    if prev is not None:
        t0 = time.time()
        refresh_report = {"previous": prev.uri, "diff": refresh.write_diff(rd, decided, prev),
                          "previous_version": prev.summary.get("version", 1),
                          "scan": (mio.read_marker(rd.fs, rd.path("stages", "scan")) or {}).get("counts", {})
                          .get("refresh")}
        timings["diff"] = round(time.time() - t0, 3)

    n_rejected = sum(sum(v.values()) for v in counts["rejected"].values())
    selection = {}
    for name in ("select", "scan", "catalog_join"):
        if name in fps:
            got = (mio.read_marker(rd.fs, rd.path("stages", name)) or {}).get("counts") or {}
            got = {k: v for k, v in got.items() if k != "input_skipped"}
            if got:
                selection["select" if name == "select" else "join"] = got
    summary = {
        "inputs": counts["curated"] + n_rejected,
        "curated": counts["curated"],
        "rejected": n_rejected,
        "rejected_by_stage": counts["rejected"],
        "selection": selection,
        "repeated_names": repeats,
        "embed": {p.name: {**((mio.read_marker(rd.fs, rd.path("stages", embed_stage(p))) or {}).get("counts") or {}),
                           "table": mio.to_uri(rd.fs, rd.path("stages", embed_stage(p))), "device": device}
                  for p in plans},
        "examples": ((mio.read_marker(rd.fs, rd.path("stages", "filter")) or {}).get("counts") or None
                     if filtering_examples else None),
        "near_dedup": ((mio.read_marker(rd.fs, rd.path("stages", "near_dedup")) or {}).get("counts") or None
                       if "near_dedup" in fps else None),
        "sample": ((mio.read_marker(rd.fs, rd.path("stages", "sample")) or {}).get("counts") or None
                   if "sample" in fps else None),
        "aesthetic": {"head": cfg.aesthetic.head, "scored": scoring_aesthetic,
                      "min_score": cfg.aesthetic.min_score if scoring_aesthetic else None},
        "warnings": [w for stage in ("filter", "near_dedup", "sample") if stage in fps
                     for w in ((mio.read_marker(rd.fs, rd.path("stages", stage)) or {}).get("counts") or {}).get(
                         "warnings") or []],
        "input_kind": kind,
        "input_skipped": ((mio.read_marker(rd.fs, rd.path("stages", "scan")) or {}).get("counts") or {}).get(
            "input_skipped") or listing.Skipped().to_dict(),
        "until": until,
        "version": prev.summary.get("version", 1) + 1 if prev is not None else 1,
        "refresh": refresh_report or None,
        "validate_fingerprint": validate_fp,
        "stages_run": [s for s in fps if s not in reused],
        "stages_reused": reused,
        "fingerprints": fps,
        "timings_s": {**timings, "total": round(time.time() - t_start, 3)},
        "config": cfg.dump(),
        "versions": versions(),
    }
    with rd.fs.open(rd.path("summary.json"), "wb") as f:
        f.write(json.dumps(summary, indent=2, sort_keys=True).encode())
    mio.write_marker(rd.fs, rd.root, {"fingerprints": fps})  # committed: the report is extra
    from pipeline import report

    report.write_report_safely(cfg.output, cfg.storage)  # a failure is a one-line warning
    return summary
