"""Near-duplicate removal, per-batch and per-group functions (Arrow in, Arrow out) that
``pipeline.neardedup`` runs on Ray Data; the algorithms are in ``stages.kernels.neardup``.

Node names in the pair graph are ``_key`` = uint64 hash of the row id."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.schema import Reason, Stage
from stages.filters import embedding_matrix
from stages.kernels import neardup as kn
from stages.kernels.hashing import seeded_rank

# Default semantic thresholds (cosine of centred, L2-normalized embeddings) per model.
DEFAULT_THRESHOLDS = {
    # SSCD authors' operating point for copy detection (~90% precision on DISC21). The
    # reference walkthrough used cosine distance 0.04 (0.96), which keeps crops and overlays.
    "resnet_v1_50_c1_sscd": 0.75,
    # Measured here on real photos (tests/test_neardup.py): edited copies (JPEG q30, 50%
    # resize, 85% crop, brightness, 5 degree rotation, mirror, caption) >= 0.74, distinct
    # photos <= 0.12.
    "mobilenet_v2_imagenet": 0.6,
}


def semantic_threshold(cfg) -> tuple[float | None, str | None]:
    """The cosine threshold of the dedup model: ``near_dedup.threshold``, else the model's
    default. A model without one is a config error when ``embed.roles.dedup`` names it; when
    it is only the default first model, semantic matching is skipped (and said why)."""
    model = cfg.embed.model_for("dedup")
    if cfg.near_dedup.threshold is not None:
        return float(cfg.near_dedup.threshold), None
    if model in DEFAULT_THRESHOLDS:
        return DEFAULT_THRESHOLDS[model], None
    why = (f"no semantic threshold for dedup model {model!r} (a species-level model puts different photos of one "
           "species close together): set near_dedup.threshold")
    if "dedup" in cfg.embed.roles:
        from pipeline.config import ConfigError

        raise ConfigError(f"near_dedup.threshold: {why.split(': set')[0]}; set it, or near_dedup.semantic: false")
    return None, why + " to match by embedding; perceptual matching only"


PAIR_SCHEMA = pa.schema([("a", pa.uint64()), ("b", pa.uint64()), ("score", pa.float32())])


def _pairs(a, b, s) -> pa.Table:
    return pa.table({"a": pa.array(a, pa.uint64()), "b": pa.array(b, pa.uint64()),
                     "score": pa.array(np.asarray(s, dtype=np.float32), pa.float32())})


def alive_keyed(batch: pa.Table) -> pa.Table:
    """Rows still alive after the filters (with a hash), with their ``_key``."""
    ok = pc.and_(pc.invert(pc.is_valid(batch["reason"])), pc.is_valid(batch["sha256"]))
    alive = batch.filter(ok)
    return alive.append_column("_key", pa.array(kn.id_keys(alive["id"].to_pylist()), pa.uint64()))


# --------------------------------------------------------------------------- perceptual

def band_rows(batch: pa.Table, positions: np.ndarray, parts: int) -> pa.Table:
    """One row per (row, table): bucket key, pHash, node, and the shuffle partition."""
    has = batch.filter(pc.is_valid(batch["phash"]))
    ph = has["phash"].to_numpy().astype(np.uint64)
    node = has["_key"].to_numpy().astype(np.uint64)
    keys = kn.band_keys(ph, positions)  # (n, tables)
    t = keys.shape[1]
    bucket = keys.ravel()
    mixed = (bucket * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
    return pa.table({"part": pa.array((mixed % np.uint64(parts)).astype(np.int64)),
                     "bucket": pa.array(bucket, pa.uint64()),
                     "phash": pa.array(np.repeat(ph, t), pa.uint64()),
                     "node": pa.array(np.repeat(node, t), pa.uint64())})


def hamming_partition(group: pa.Table, max_hamming: int) -> pa.Table:
    """All pairs within ``max_hamming`` among the rows of one shuffle partition that share
    a bucket (score = Hamming distance)."""
    if len(group) == 0:
        return PAIR_SCHEMA.empty_table()
    a, b, h = kn.hamming_pairs(group["bucket"].to_numpy().astype(np.uint64),
                               group["phash"].to_numpy().astype(np.uint64),
                               group["node"].to_numpy().astype(np.uint64), max_hamming)
    return _pairs(*kn.spanning_pairs(a, b, h))


# --------------------------------------------------------------------------- semantic

def sample_rows(batch: pa.Table, seed: int, cutoff: int) -> pa.Table:
    """Rows whose hash(seed, id) rank is at most ``cutoff``: a sample independent of blocks."""
    rank = seeded_rank(seed, batch["id"].to_pylist())
    keep = (rank <= np.uint64(cutoff)) & ~np.asarray(batch["embedding"].is_null().to_numpy(zero_copy_only=False))
    return batch.filter(pa.array(keep)).select(["id", "embedding"])


def assign_rows(batch: pa.Table, mean: np.ndarray | None, partition, m: int) -> pa.Table:
    """Centred, normalized float16 vector and the ``m`` partitions of every row with an embedding."""
    x, valid = embedding_matrix(batch["embedding"])
    x = kn.center_normalize(x[valid], mean)
    dim = x.shape[1] if len(x) else partition.fine.shape[1]
    if len(x) == 0:
        idx = np.zeros((0, m), np.int64)
    else:
        idx, _ = partition.assign(x, m)
    return pa.table({
        "node": batch["_key"].filter(pa.array(valid)),
        "parts": pa.FixedSizeListArray.from_arrays(pa.array(idx.ravel().astype(np.int64)), idx.shape[1]),
        "x": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).ravel()), dim),
    })


def part_counts(batch: pa.Table, k: int) -> pa.Table:
    idx = batch["parts"].combine_chunks().flatten().to_numpy() if len(batch) else np.zeros(0, np.int64)
    return pa.table({"counts": [np.bincount(idx, minlength=k).tolist()]})


def cell_rows(batch: pa.Table, packing: dict) -> pa.Table:
    """One row per (row, partition) copy with the bucket it is stored in (``kn.pack_cells``)."""
    parts = batch["parts"].combine_chunks().flatten().to_numpy().reshape(len(batch), -1)
    node = batch["node"].to_numpy().astype(np.uint64)
    take = pa.array(np.repeat(np.arange(len(batch)), parts.shape[1]))
    return pa.table({"bucket": pa.array(kn.bucket_of(parts, node, packing).ravel().astype(np.int32)),
                     "part": pa.array(parts.ravel().astype(np.int32)), "node": batch["node"].take(take),
                     "x": batch["x"].take(take)})


def _read_bucket(fs, root: str, bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from manifests import io as mio

    folder = mio.join(root, f"bucket={bucket}")
    files = sorted(f for f in fs.find(folder) if f.endswith(".parquet")) if fs.exists(folder) else []
    tables = []
    for f in files:
        with fs.open(f, "rb") as fh:
            tables.append(pq.read_table(fh, columns=["part", "node", "x"]))
    if not tables:
        return np.zeros(0, np.int32), np.zeros(0, np.uint64), np.zeros((0, 1), np.float32)
    t = pa.concat_tables(tables)
    x, _ = embedding_matrix(t["x"])
    return t["part"].to_numpy(), t["node"].to_numpy().astype(np.uint64), x


def compare_buckets(tasks: pa.Table, root: str, storage, threshold: float) -> pa.Table:
    """The pairs of comparison tasks (u, v) over buckets written under ``root``."""
    from manifests import io as mio

    fs, path = mio.filesystem(root, storage)
    out = []
    for u, v in zip(tasks["u"].to_pylist(), tasks["v"].to_pylist()):
        bu = _read_bucket(fs, path, u)
        out.append(kn.bucket_pairs(bu, None if u == v else _read_bucket(fs, path, v), threshold))
    return _pairs(*kn.spanning_pairs(*kn.merge_pairs(out), keep_max=True))


# --------------------------------------------------------------------------- members

def member_rows(batch: pa.Table, members: np.ndarray, columns: list[str]) -> pa.Table:
    """The alive rows that are in a group, with the columns the keep policy reads."""
    key = batch["_key"].to_numpy().astype(np.uint64)
    pos = np.searchsorted(members, key).clip(0, max(0, len(members) - 1))
    hit = (members[pos] == key) if len(members) else np.zeros(len(key), bool)
    return batch.filter(pa.array(hit)).select(["id", "_key", *columns])


def decide_groups(rows: pa.Table, root: dict, edges: dict, seed: int, quality: str | None, licence: str | None,
                  permissive: str, taxon: str | None, ref_groups: dict | None = None,
                  prior: np.ndarray | None = None) -> pa.Table:
    """Keep one row per group (kept by a previous run -- ``prior``, sorted sha256 keys --,
    permissive licence, quality, pixels, hash(seed, id)); the others become rejects naming
    the kept id. A group holding an image of a reference set
    (``ref_groups``: group -> (set name, reference id)) keeps none of its corpus rows. One
    row per member (corpus rows only)."""
    ref_groups = ref_groups or {}
    n = len(rows)
    ids = rows["id"].to_pylist()
    keys = rows["_key"].to_numpy().astype(np.uint64)
    group = np.array([root[int(k)] for k in keys], dtype=np.uint64)
    if licence:
        rx = re.compile(permissive, re.I)
        permissive_ok = np.array([bool(v) and bool(rx.search(str(v))) for v in rows[licence].to_pylist()])
    else:
        permissive_ok = np.zeros(n, bool)
    q = (rows[quality].to_numpy(zero_copy_only=False).astype(np.float64) if quality else np.full(n, np.nan))
    w = rows["width"].to_numpy(zero_copy_only=False).astype(np.float64)
    h = rows["height"].to_numpy(zero_copy_only=False).astype(np.float64)
    rank = seeded_rank(seed, ids)
    kept_before = None
    if prior is not None:
        from stages.embed import is_known

        kept_before = is_known(prior, rows["sha256"].to_pylist())
    order = kn.keep_order(permissive_ok, q, np.nan_to_num(w * h), rank, kept_before)
    order = order[np.argsort(group[order], kind="stable")]  # by group, best first inside
    taxa = rows[taxon].to_pylist() if taxon else [None] * n
    out = {k: [] for k in ("id", "near_dup_group", "duplicate_of", "reason", "detail", "near_dup_similarity",
                           "near_dup_ids", "taxonomy_conflict")}
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(order)]):
        members = order[s:e]
        kept = members[0]
        gname = f"{int(group[kept]):016x}"
        labels = {str(taxa[i]) for i in members if taxa[i] is not None}
        conflict = len(labels) > 1
        ref = ref_groups.get(int(group[kept]))
        for i in members:
            best_h, best_cos = edges.get(int(keys[i]), (None, None))
            out["id"].append(ids[i])
            out["near_dup_group"].append(gname)
            out["taxonomy_conflict"].append(conflict)
            how = f"pHash Hamming {best_h}" if best_h is not None else f"cosine {best_cos:.4f}"
            sim = float(best_cos) if best_cos is not None else float(1 - best_h / 64)
            if ref is not None:
                out["duplicate_of"].append(ref[1])
                out["reason"].append(Reason.DUPLICATE_OF_REFERENCE.value)
                out["detail"].append(f"near-duplicate of {ref[1]} in reference set '{ref[0]}' (closest pair: {how})")
                out["near_dup_similarity"].append(sim)
                out["near_dup_ids"].append(None)
                continue
            if i == kept:
                out["duplicate_of"].append(None)
                out["reason"].append(None)
                out["detail"].append(None)
                out["near_dup_similarity"].append(None)
                out["near_dup_ids"].append([ids[j] for j in members[1:]])
                continue
            perceptual = best_h is not None
            out["duplicate_of"].append(ids[kept])
            out["reason"].append((Reason.PERCEPTUAL_DUPLICATE if perceptual else Reason.SEMANTIC_DUPLICATE).value)
            out["detail"].append(f"near-duplicate of {ids[kept]} (group of {len(members)}; closest pair: {how}"
                                 + ("; taxonomy conflict in the group" if conflict else "") + ")")
            out["near_dup_similarity"].append(sim)
            out["near_dup_ids"].append(None)
    return pa.table({
        "id": pa.array(out["id"], pa.string()), "_nd_group": pa.array(out["near_dup_group"], pa.string()),
        "_nd_duplicate_of": pa.array(out["duplicate_of"], pa.string()),
        "_nd_reason": pa.array(out["reason"], pa.string()), "_nd_detail": pa.array(out["detail"], pa.string()),
        "_nd_similarity": pa.array(out["near_dup_similarity"], pa.float32()),
        "_nd_ids": pa.array(out["near_dup_ids"], pa.list_(pa.string())),
        "_nd_conflict": pa.array(out["taxonomy_conflict"], pa.bool_()),
    })


DECISION_COLUMNS = ["_nd_group", "_nd_duplicate_of", "_nd_reason", "_nd_detail", "_nd_similarity", "_nd_ids",
                    "_nd_conflict"]


def apply_decisions(batch: pa.Table) -> pa.Table:
    """Rows joined (left) with the decisions: members of a group get ``near_dup_group``,
    ``near_dup_similarity``, ``near_dup_ids`` (kept rows: the other members) and
    ``taxonomy_conflict``; removed ones become rejects with ``duplicate_of``."""
    n = len(batch)
    if "_nd_reason" not in batch.column_names:  # nothing to decide (no groups)
        batch = batch.append_column("_nd_reason", pa.nulls(n, pa.string()))
        for c, t in (("_nd_group", pa.string()), ("_nd_duplicate_of", pa.string()), ("_nd_detail", pa.string()),
                     ("_nd_similarity", pa.float32()), ("_nd_ids", pa.list_(pa.string())),
                     ("_nd_conflict", pa.bool_())):
            batch = batch.append_column(c, pa.nulls(n, t))
    reason = batch["_nd_reason"].to_pylist()
    stage, why, detail = batch["stage"].to_pylist(), batch["reason"].to_pylist(), batch["detail"].to_pylist()
    dup = batch["duplicate_of"].to_pylist() if "duplicate_of" in batch.column_names else [None] * n
    nd_dup, nd_detail = batch["_nd_duplicate_of"].to_pylist(), batch["_nd_detail"].to_pylist()
    for i, r in enumerate(reason):
        if r is not None and why[i] is None:
            stage[i], why[i], detail[i], dup[i] = Stage.NEAR_DEDUP.value, r, nd_detail[i], nd_dup[i]
    out = batch.drop_columns([c for c in (*DECISION_COLUMNS, "stage", "reason", "detail", "duplicate_of")
                              if c in batch.column_names])
    out = (out.append_column("stage", pa.array(stage, pa.string())).append_column("reason", pa.array(why, pa.string()))
           .append_column("detail", pa.array(detail, pa.string()))
           .append_column("duplicate_of", pa.array(dup, pa.string())))
    return (out.append_column("near_dup_group", batch["_nd_group"])
            .append_column("near_dup_similarity", batch["_nd_similarity"])
            .append_column("near_dup_ids", batch["_nd_ids"])
            .append_column("taxonomy_conflict", batch["_nd_conflict"]))
