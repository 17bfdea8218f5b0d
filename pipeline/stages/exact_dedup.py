"""exact_dedup: byte-identical images (same sha256) keep one copy; an image served for
many inputs (a placeholder) is rejected whole. Rows are grouped by a partition of their
sha256 (a hash shuffle) and each partition is decided by ``stages.exact_dedup`` (pure)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

import stages.exact_dedup
from manifests import rejects
from manifests.config import PipelineConfig
from manifests.schema import Stage
from pipeline import embedding, joins
from pipeline.stage import Context, StageDef


def _has_sha(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["sha256"]))


def _no_sha(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(pc.is_valid(batch["sha256"])))


def _with_duplicate_of(batch: pa.Table) -> pa.Table:
    return rejects.ensure_columns(batch, duplicate_of=True)  # the same columns as a decided partition


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
    decided = joins.map_groups(
        hashed.map_batches(_sha_partition, batch_format="pyarrow", fn_kwargs={"parts": partitions}), "_xpart",
        _exact_dedup_partition, partitions, {"cfg": cfg.exact_dedup, "seed": cfg.run.seed})
    return decided.union(unhashed)


def _sha_partition(batch: pa.Table, parts: int) -> pa.Table:
    head = pc.utf8_slice_codeunits(batch["sha256"], 0, 8).to_pylist()
    return batch.append_column("_xpart", pa.array([int(h, 16) % parts for h in head], pa.int32()))


def _exact_dedup_partition(batch: pa.Table, cfg, seed: int) -> pa.Table:
    return stages.exact_dedup.exact_dedup_batch(batch.drop_columns(["_xpart"]), cfg, seed)


def _build(ctx: Context, out):
    narrow = ctx.rd.read(ctx.upstream).map_batches(embedding.drop_embeddings, batch_format="pyarrow")
    return exact_dedup_dataset(ctx.cfg, narrow), {}


STAGE = StageDef(
    name=Stage.EXACT_DEDUP, module=__name__, sections=("exact_dedup", "run.seed"),
    doc="Byte-identical copies (sha256) keep one; a placeholder image served for many inputs is rejected",
    resources="hash shuffle by sha256 partition, CPU tasks",
    enabled=lambda ctx: ctx.cfg.exact_dedup.enabled, build=_build,
    describe=lambda ctx: f"groupby(sha256).map_groups  placeholder_min_copies="
                         f"{ctx.cfg.exact_dedup.placeholder_min_copies}")
