"""Near-duplicate removal, per-batch and per-group functions (Arrow in, Arrow out) that
``pipeline.stages.near_dedup`` runs on Ray Data; the algorithms are in ``stages.kernels.near_dedup``.

Node names in the pair graph are ``_key`` = uint64 hash of the row id."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.rejects import alive, reject
from manifests.schema import Reason, Stage
from stages.filters import embedding_matrix
from stages.kernels import near_dedup as kn
from stages.kernels.hashing import seeded_rank

# Default semantic thresholds (cosine of centred, L2-normalized embeddings) per model.
DEFAULT_THRESHOLDS = {
    # SSCD authors' operating point for copy detection (~90% precision on DISC21). The
    # reference walkthrough used cosine distance 0.04 (0.96), which keeps crops and overlays.
    "resnet_v1_50_c1_sscd": 0.75,
    # Measured on 65 real photos from six packages and their edits (bench/dedup_calibration.py,
    # tests/test_dedup_calibration.py): the lowest value merging no two distinct photos. The
    # closest distinct pair, two photos of one staged kitchen (both brightened), is at 0.764
    # (originals at most 0.741; 99.9% of distinct pairs <= 0.48); the lowest edited copy it
    # accepts that pHash misses is at 0.776. Edit-pair recall with pHash (q30, 50% resize,
    # crop 85%, brightness, rotation 5 degrees, mirror, caption): 0.976, 0.980 with flip.
    # 0.6 (the old value) merged 129 distinct pairs.
    "mobilenet_v2_imagenet": 0.77,
}


MARGIN_BAND = 0.02  # removals this close above the threshold are the ones a small shift would keep


def margin_warning(similarities: list[float], threshold: float, band: float = MARGIN_BAND) -> str | None:
    """One line when the semantic removals crowd the threshold: at least 3 of them, and at
    least a tenth, within ``band`` above it (the calibrated MobileNetV2 margin is 0.012): the
    threshold then decides many removals by a hair, and they deserve a look."""
    sims = np.asarray([s for s in similarities if s is not None], dtype=np.float64)
    close = int(np.sum(sims < threshold + band))
    if close >= 3 and close >= 0.1 * len(sims):
        return (f"near_dedup: {close} of {len(sims)} semantic removals are within {band} of the threshold "
                f"{threshold} (cosine < {threshold + band:.2f}); check them with biocurate dedup-report")
    return None


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
        from manifests.config import ConfigError

        raise ConfigError(f"near_dedup.threshold: {why.split(': set')[0]}; set it, or near_dedup.semantic: false")
    return None, why + " to match by embedding; perceptual matching only"


PAIR_SCHEMA = pa.schema([("a", pa.uint64()), ("b", pa.uint64()), ("score", pa.float32())])


def _pairs(a, b, s) -> pa.Table:
    return pa.table({"a": pa.array(a, pa.uint64()), "b": pa.array(b, pa.uint64()),
                     "score": pa.array(np.asarray(s, dtype=np.float32), pa.float32())})


def alive_keyed(batch: pa.Table) -> pa.Table:
    """Rows still alive after the filters (with a hash), with their ``_key``."""
    rows = batch.filter(pc.and_(pa.array(alive(batch)), pc.is_valid(batch["sha256"])))
    return rows.append_column("_key", pa.array(kn.id_keys(rows["id"].to_pylist()), pa.uint64()))


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


def compare_buckets(tasks: pa.Table, root: str, storage, threshold: float, low: float | None = None,
                    near_per_row: int = 2) -> pa.Table:
    """The pairs of comparison tasks (u, v) over buckets written under ``root``: a
    spanning forest of the pairs at cosine >= ``threshold`` (``matched``), and, with
    ``low``, each row's ``near_per_row`` best pairs in [low, threshold) (near misses, for
    the dedup report: what the threshold just left apart)."""
    from manifests import io as mio

    fs, path = mio.filesystem(root, storage)
    out = []
    cut = threshold if low is None else min(low, threshold)
    for u, v in zip(tasks["u"].to_pylist(), tasks["v"].to_pylist()):
        bu = _read_bucket(fs, path, u)
        out.append(kn.bucket_pairs(bu, None if u == v else _read_bucket(fs, path, v), cut))
    a, b, s = kn.merge_pairs(out)
    hit = s >= threshold
    found = _pairs(*kn.spanning_pairs(a[hit], b[hit], s[hit], keep_max=True))
    near = _pairs(*kn.top_pairs(a[~hit], b[~hit], s[~hit], near_per_row))
    return pa.concat_tables([found.append_column("matched", pa.array(np.ones(len(found), bool))),
                             near.append_column("matched", pa.array(np.zeros(len(near), bool)))])


# --------------------------------------------------------------------------- members

MAX_KEPT = 20_000  # kept rows after which a component's remaining rows stay kept undecided

POLICIES = ("direct", "component")


def group_rows(batch: pa.Table, nodes: np.ndarray, roots: np.ndarray, columns: list[str]) -> pa.Table:
    """The rows of ``batch`` that are nodes of the pair graph (``nodes`` sorted), with the
    columns the keep policy reads and ``_group``, their component's root."""
    key = batch["_key"].to_numpy().astype(np.uint64)
    pos, hit = kn.sorted_lookup(nodes, key)
    out = batch.filter(pa.array(hit)).select([c for c in dict.fromkeys(["id", "_key", *columns])
                                              if c in batch.column_names])
    return out.append_column("_group", pa.array(roots[pos[hit]], pa.uint64()))


def _vectors(rows: pa.Table, column: str, mean: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray]:
    if column not in rows.column_names or len(rows) == 0:
        return None, np.zeros(len(rows), bool)
    x, valid = embedding_matrix(rows[column])
    out = np.zeros((len(rows), x.shape[1] if x.ndim == 2 else 1), np.float32)
    if valid.any():
        out[valid] = kn.center_normalize(x[valid], mean)
    return out, valid


def decide_groups(rows: pa.Table, params: dict, prior: np.ndarray | None = None) -> pa.Table:
    """Decide every group (``_group``) of ``rows``: corpus rows and reference rows
    (``_ref_set`` not null: an image of a reference set, never decided). One row out per
    corpus row.

    ``params``: ``policy`` -- ``direct`` (:func:`kn.direct_keep`: a row is removed only when
    it directly matches a kept row, which it names, with that pair's similarity) or
    ``component`` (one row kept per group, the rest removed naming it, matched or not);
    ``threshold`` (cosine, None: perceptual only), ``max_hamming`` (None: semantic only),
    ``mean`` (the centring of the ``embedding`` column), ``flip`` (``embedding_flip``
    holds the mirror images' embeddings), ``seed``, ``quality``/``licence``/``permissive``/
    ``taxon`` (keep order and conflicts). ``prior``: sorted sha256 keys kept by a previous
    run; they come first. Whatever the policy, ``_nd_component_removed`` says whether the
    component policy would remove the row, so both counts can be reported."""
    if len(rows) == 0:
        return _decisions_table({k: [] for k in _OUT})
    policy = params.get("policy", "direct")
    rows = rows.sort_by([("_group", "ascending"), ("id", "ascending")])  # independent of arrival order
    n = len(rows)
    ids = rows["id"].to_pylist()
    group = rows["_group"].to_numpy().astype(np.uint64)
    ref_set = rows["_ref_set"].to_pylist() if "_ref_set" in rows.column_names else [None] * n
    ref_id = rows["_ref_id"].to_pylist() if "_ref_id" in rows.column_names else [None] * n
    is_ref = np.array([r is not None for r in ref_set], bool)

    def col(name, fill):
        if name and name in rows.column_names:
            return rows[name].to_numpy(zero_copy_only=False)
        return np.full(n, fill)

    licence = params.get("licence")
    if licence and licence in rows.column_names:
        rx = re.compile(params.get("permissive") or "^$", re.I)
        permissive_ok = np.array([bool(v) and bool(rx.search(str(v))) for v in rows[licence].to_pylist()])
    else:
        permissive_ok = np.zeros(n, bool)
    q = col(params.get("quality"), np.nan).astype(np.float64)
    w = np.nan_to_num(col("width", np.nan).astype(np.float64))
    h = np.nan_to_num(col("height", np.nan).astype(np.float64))
    rank = seeded_rank(params.get("seed", 0), ids)
    kept_before = None
    if prior is not None and "sha256" in rows.column_names:
        from stages.embed import is_known

        kept_before = is_known(prior, [s or "" for s in rows["sha256"].to_pylist()])
    order = kn.keep_order(permissive_ok, q, w * h, rank, kept_before)
    order = order[np.argsort(group[order], kind="stable")]  # by group, best first inside
    threshold, max_hamming = params.get("threshold"), params.get("max_hamming")
    x, has_x = _vectors(rows, "embedding", params.get("mean")) if threshold is not None else (None, np.zeros(n, bool))
    xf = _vectors(rows, "embedding_flip", params.get("mean"))[0] if (x is not None and params.get("flip")) else None
    has_ph = np.asarray(rows["phash"].is_valid()) if "phash" in rows.column_names else np.zeros(n, bool)
    ph = (np.array([v or 0 for v in rows["phash"].to_pylist()], dtype=np.uint64) if "phash" in rows.column_names
          else np.zeros(n, np.uint64))
    taxa = rows[params["taxon"]].to_pylist() if params.get("taxon") in rows.column_names else [None] * n
    out = {k: [] for k in _OUT}
    starts = np.flatnonzero(np.r_[True, group[order][1:] != group[order][:-1]])
    for s, e in zip(starts, np.r_[starts[1:], len(order)]):
        everyone = order[s:e]
        refs = everyone[is_ref[everyone]]
        members = everyone[~is_ref[everyone]]
        if len(members) == 0:
            continue
        gname = f"{int(group[members[0]]):016x}"
        labels = {str(taxa[i]) for i in members if taxa[i] is not None}
        conflict = len(labels) > 1
        local = np.concatenate([refs, members])  # this group's rows: references, then members best first
        d = kn.direct_keep(np.arange(len(refs), len(local)), np.arange(len(refs)), ph[local], has_ph[local],
                           None if x is None else x[local], has_x[local], threshold, max_hamming,
                           None if xf is None else xf[local], MAX_KEPT)
        d["match"] = np.where(d["match"] >= 0, local[np.maximum(d["match"], 0)], d["match"])
        d = {k: dict(zip(local.tolist(), v.tolist())) for k, v in d.items()}  # by table row
        match = d["match"]
        removed_by = {}
        if policy == "direct":
            for i in members:
                if match[i] >= 0:
                    removed_by.setdefault(int(match[i]), []).append(i)
        for i in members:
            out["id"].append(ids[i])
            out["_nd_group"].append(gname)
            out["_nd_conflict"].append(conflict)
            out["_nd_component_removed"].append(bool(len(refs)) or i != members[0])
            out["_nd_direct_removed"].append(bool(match[i] >= 0))
            out["_nd_undecided"].append(bool(match[i] == kn.NOT_DECIDED))
            if policy == "component":
                target = refs[0] if len(refs) else (None if i == members[0] else members[0])
            else:
                target = int(match[i]) if match[i] >= 0 else None
            if target is None:
                out["_nd_duplicate_of"].append(None)
                out["_nd_reason"].append(None)
                out["_nd_detail"].append(None)
                out["_nd_similarity"].append(None)
                if policy == "component":
                    out["_nd_ids"].append([ids[j] for j in members[1:]])
                else:
                    out["_nd_ids"].append([ids[j] for j in removed_by.get(int(i), [])] or None)
                continue
            # the pair (row, the row it is removed for), measured here: what the reject says is of this pair
            ham = int(kn.hamming64(ph[i:i + 1], ph[target:target + 1])[0]) if has_ph[i] and has_ph[target] else None
            cos = None
            if x is not None and has_x[i] and has_x[target]:
                c = [x[i] @ x[target]]
                if xf is not None:
                    c += [xf[i] @ x[target], x[i] @ xf[target], xf[i] @ xf[target]]
                cos = float(max(c))
            by_h = ham is not None and max_hamming is not None and ham <= max_hamming
            by_s = cos is not None and cos >= threshold
            numbers = ", ".join([*([f"pHash Hamming {ham}"] if ham is not None else []),
                                 *([f"cosine {cos:.4f}"] if cos is not None else [])])
            how = numbers if (by_h or by_s) else "matched through the group, not directly" + (
                f": {numbers}" if numbers else "")
            perceptual = by_h or (not by_s and (threshold is None or d["hamming"][i] >= 0))
            sim = (1 - ham / 64 if by_h else cos) if (by_h or by_s) else None
            out["_nd_similarity"].append(None if sim is None else float(sim))
            out["_nd_ids"].append(None)
            extra = (f"; group of {len(members)}" if len(members) > 1 else "") + (
                "; taxonomy conflict in the group" if conflict else "")
            if is_ref[target]:
                out["_nd_duplicate_of"].append(ref_id[target])
                out["_nd_reason"].append(Reason.DUPLICATE_OF_REFERENCE.value)
                out["_nd_detail"].append(f"near-duplicate of {ref_id[target]} in reference set "
                                         f"'{ref_set[target]}' ({how}{extra})")
                continue
            out["_nd_duplicate_of"].append(ids[target])
            out["_nd_reason"].append((Reason.PERCEPTUAL_DUPLICATE if perceptual else Reason.SEMANTIC_DUPLICATE).value)
            out["_nd_detail"].append(f"near-duplicate of {ids[target]} ({how}{extra})")
    return _decisions_table(out)


_OUT = {"id": pa.string(), "_nd_group": pa.string(), "_nd_duplicate_of": pa.string(), "_nd_reason": pa.string(),
        "_nd_detail": pa.string(), "_nd_similarity": pa.float32(), "_nd_ids": pa.list_(pa.string()),
        "_nd_conflict": pa.bool_(), "_nd_component_removed": pa.bool_(), "_nd_direct_removed": pa.bool_(),
        "_nd_undecided": pa.bool_()}


def _decisions_table(out: dict) -> pa.Table:
    return pa.table({k: pa.array(out[k], t) for k, t in _OUT.items()})


DECISION_COLUMNS = ["_nd_group", "_nd_duplicate_of", "_nd_reason", "_nd_detail", "_nd_similarity", "_nd_ids",
                    "_nd_conflict", "_nd_component_removed", "_nd_direct_removed", "_nd_undecided"]


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
    removed = np.asarray(pc.is_valid(batch["_nd_reason"]).to_numpy(zero_copy_only=False), dtype=bool)
    out = reject(batch, removed, Stage.NEAR_DEDUP, batch["_nd_reason"], batch["_nd_detail"],
                 duplicate_of=batch["_nd_duplicate_of"])
    out = out.drop_columns([c for c in DECISION_COLUMNS if c in out.column_names])
    return (out.append_column("near_dup_group", batch["_nd_group"])
            .append_column("near_dup_similarity", batch["_nd_similarity"])
            .append_column("near_dup_ids", batch["_nd_ids"])
            .append_column("taxonomy_conflict", batch["_nd_conflict"]))
