"""Near-duplicate removal on Ray Data, among the rows alive after the filters.

1. perceptual: every alive row emits one (bucket, pHash) row per LSH table; a hash shuffle
   on the bucket's partition brings bucket mates together; pairs within the Hamming radius
   are verified exactly. Tables follow from the recall target at the radius.
2. semantic: spherical k-means on a sample drawn by hash(seed, id) (one process: a
   deterministic fit); every row joins its m nearest partitions (m calibrated for the
   recall target at the threshold); partition sizes are counted first and a partition
   above ``max_block`` rows is compared block pair by block pair; pairs at cosine >=
   threshold are verified exactly inside each group.
3. the pairs (a few per duplicate, not per row) become groups by union-find in the driver;
   the group members' keep-policy columns are fetched, one row is kept per group, and
   the decisions are joined back to the narrow table by id.

Memory per worker is bounded by a shuffle partition / two blocks, never by the corpus; the
driver holds the pair graph (proportional to the duplicates found).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from manifests import io as mio
from pipeline import joins
from pipeline.config import TAXON_COLUMNS, ConfigError, PipelineConfig, resolve_column
from stages import neardup as snd
from stages.kernels import kmeans
from stages.kernels import neardup as kn

ROWS_PER_PARTITION = 2_000_000  # shuffle partitions of the perceptual band rows


def _take_pairs(ds: ray.data.Dataset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    parts = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if len(t)]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32)
    t = pa.concat_tables(parts)
    return (t["a"].to_numpy().astype(np.uint64), t["b"].to_numpy().astype(np.uint64),
            t["score"].to_numpy().astype(np.float32))


def perceptual_pairs(cfg: PipelineConfig, alive: ray.data.Dataset, n: int) -> tuple[tuple, dict]:
    c = cfg.near_dedup
    params = kn.perceptual_params(c.max_hamming, c.recall, c.perceptual_bits)
    positions = kn.band_positions(params["tables"], c.perceptual_bits, cfg.run.seed)
    parts = int(max(1, min(1000, math.ceil(n * params["tables"] / ROWS_PER_PARTITION))))
    rows = alive.map_batches(snd.band_rows, batch_format="pyarrow", fn_kwargs={"positions": positions, "parts": parts})
    pairs = rows.groupby("part", num_partitions=min(parts, 200)).map_groups(
        snd.hamming_partition, batch_format="pyarrow", fn_kwargs={"max_hamming": c.max_hamming})
    a, b, h = _take_pairs(pairs)
    a, b, h = kn.spanning_pairs(*kn.unique_pairs(a, b, h))
    params.update({"partitions": parts, "pairs": int(len(a))})
    return (a, b, h), params


def semantic_pairs(cfg: PipelineConfig, rows: ray.data.Dataset, n: int, model: str,
                   threshold: float) -> tuple[tuple, dict]:
    """``rows``: alive rows with ``_key`` and the dedup model's ``embedding``."""
    c = cfg.near_dedup
    cutoff = min(2**64 - 1, int(c.sample_size / max(1, n) * 2**64))
    got = rows.map_batches(snd.sample_rows, batch_format="pyarrow",
                           fn_kwargs={"seed": cfg.run.seed, "cutoff": cutoff}).take_all()
    empty = (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32))
    if len(got) < 2:
        return empty, {"threshold": threshold, "pairs": 0, "sample": len(got)}
    got.sort(key=lambda r: r["id"])  # the same sample in the same order whatever the blocks
    x = np.asarray([r["embedding"] for r in got], dtype=np.float32)
    mean = x.mean(axis=0) if c.center else None
    xs = kn.center_normalize(x, mean)
    # Partitions hold about partition_size rows *after* each row joins m of them: fit,
    # calibrate m, and refit once with m times more partitions when m > 1. Calibration uses
    # held-out sample rows (every fifth): rows the centroids were fitted on sit closer to
    # them, which would make m look sufficient when it is not.
    held = np.arange(len(xs)) % 5 == 4
    fit_rows, calib_rows = (xs[~held], xs[held]) if held.sum() >= 2 and (~held).sum() >= 2 else (xs, xs)
    k = int(max(1, min(len(fit_rows) // 4 or 1, math.ceil(n / c.partition_size))))
    for _ in range(2):
        partition, inertia = kmeans.Partition.fit(fit_rows, k, iters=c.kmeans_iters, seed=cfg.run.seed)
        m, curve = kn.calibrate_assign(calib_rows, partition, threshold, c.recall, min(c.max_assign, partition.k),
                                       seed=cfg.run.seed)
        wanted = int(max(1, min(len(fit_rows) // 4 or 1, math.ceil(m * n / c.partition_size))))
        if wanted <= k * 1.2:
            break
        k = wanted
    k = partition.k
    assigned = rows.map_batches(snd.assign_rows, batch_format="pyarrow",
                                fn_kwargs={"mean": mean, "partition": partition, "m": m}).materialize()
    counts = np.zeros(k, np.int64)
    for r in assigned.map_batches(snd.part_counts, batch_format="pyarrow", fn_kwargs={"k": k}).take_all():
        counts += np.asarray(r["counts"], dtype=np.int64)
    packing = kn.pack_cells(counts, c.max_block, c.bucket_rows)
    # Copies are written once, grouped by bucket (a shuffle through the run's storage: one
    # copy on disk, bounded memory); each task then reads its one or two buckets.
    fs, root = mio.filesystem(cfg.output, cfg.storage)
    scratch = mio.join(root, "stages", "near_dedup_scratch")
    if fs.exists(scratch):
        fs.rm(scratch, recursive=True)
    fs.makedirs(scratch, exist_ok=True)
    try:
        assigned.map_batches(snd.cell_rows, batch_format="pyarrow", batch_size=4096,
                             fn_kwargs={"packing": packing}).write_parquet(
            scratch, partition_cols=["bucket"], filesystem=mio.arrow_filesystem(fs), compression="none")
        del assigned
        tasks = packing["tasks"]
        pairs = ray.data.from_items([{"u": u, "v": v} for u, v in tasks], override_num_blocks=len(tasks)).map_batches(
            snd.compare_buckets, batch_format="pyarrow", batch_size=1,
            fn_kwargs={"root": mio.to_uri(fs, scratch), "storage": cfg.storage, "threshold": threshold})
        a, b, s = _take_pairs(pairs)
    finally:
        fs.rm(scratch, recursive=True)
    a, b, s = kn.spanning_pairs(*kn.unique_pairs(a, b, s, keep_max=True), keep_max=True)
    report = {"model": model, "threshold": threshold, "centred": c.center, "sample": len(xs), "partitions": k,
              "coarse_cells": len(partition.coarse),
              "kmeans_mean_cosine_distance": round(inertia, 5), "assign": m,
              "boundary_recall_at_threshold": {str(i): round(v, 4) for i, v in curve.items()},
              "largest_partition": int(counts.max()), "blocked_partitions": int((packing["blocks"] > 1).sum()),
              "buckets": int(packing["bucket"].max()) + 1, "tasks": len(packing["tasks"]), "pairs": int(len(a))}
    return (a, b, s), report


def reference_sets(cfg: PipelineConfig, plan, device: str) -> tuple[pa.Table | None, dict, dict]:
    """The reference images as rows ``id, _key, phash, embedding`` (ids ``<set>:<id>``), a
    map node -> (set name, reference id), and a report per set.

    A previous run directory contributes its curated manifest's pHashes, and its
    embeddings when they come from the same model and preprocessing (else the set is
    matched perceptually only, and the report says so); an image folder or a uri table is
    fetched, validated and embedded like the corpus (through the embedding cache)."""
    from pipeline.examples import embed_listed, is_table, read_small_table
    from stages import ingest
    from stages.ids import with_protocol_rejects

    parts, refmap, report = [], {}, {}
    dtype = plan.arrow_type() if plan else None
    for ref in cfg.near_dedup.references:
        fs, root = mio.filesystem(ref.path, cfg.storage)
        ids, phash, embs, note = [], [], [], None
        if mio.is_committed(fs, mio.join(root, "curated")):
            cur = mio.read_committed_table(mio.to_uri(fs, mio.join(root, "curated")), cfg.storage)
            if len(cur):
                cur = cur.select(["id", "phash"])
            ids, phash = cur["id"].to_pylist() if len(cur) else [], cur["phash"].to_pylist() if len(cur) else []
            vec = {}
            if plan is not None:
                from pipeline.plan import embed_stage

                stage = mio.join(root, "stages", embed_stage(plan))
                marker = (mio.read_marker(fs, stage) or {}).get("counts") or {}
                if marker.get("model_id") == plan.model_id and marker.get("prep") == plan.prep:
                    t = mio.read_committed_table(mio.to_uri(fs, stage), cfg.storage).select(["id", "embedding"])
                    wanted = set(ids)
                    vec = {i: e for i, e in zip(t["id"].to_pylist(), t["embedding"].to_pylist()) if i in wanted}
                else:
                    note = (f"no embeddings of {plan.model_id} (prep {plan.prep}) in {ref.path}: matched "
                            "perceptually only")
            embs = [vec.get(i) for i in ids]
            kind = "run"
        else:
            try:
                if is_table(ref.path):
                    t = read_small_table(ref.path, cfg, "near_dedup.references")
                    uris = [str(u) for u in t["uri"].to_pylist() if u]
                else:
                    uris = ingest.list_prefix(ref.path, cfg.storage, cfg.input.extensions)
            except (OSError, KeyError, ValueError) as e:
                raise ConfigError(f"near_dedup.references: cannot list {ref.path}: {e}") from None
            rows = with_protocol_rejects(ingest.uri_rows(uris), cfg.storage.allowed_protocols)
            got, counts = embed_listed(cfg, rows, plan, device, ["id"]) if uris else ([], {})
            ids = [r["id"] for r in got]
            phash = [r["phash"] for r in got]
            embs = [r["embedding"] for r in got]
            kind = "images"
            report[ref.name] = {"embedding_counts": counts}
        names = [f"{ref.name}:{i}" for i in ids]
        keys = kn.id_keys(names)
        for k, i in zip(keys.tolist(), ids):
            refmap[k] = (ref.name, i)
        cols = {"id": pa.array(names, pa.string()), "_key": pa.array(keys, pa.uint64()),
                "phash": pa.array(phash, pa.uint64())}
        if dtype is not None:
            cols["embedding"] = pa.array(embs, dtype)
        parts.append(pa.table(cols))
        report.setdefault(ref.name, {}).update({"kind": kind, "images": len(ids),
                                                "with_embedding": sum(e is not None for e in embs), "note": note})
    return (pa.concat_tables(parts) if parts else None), refmap, report


def references_fingerprint(cfg: PipelineConfig) -> str:
    """What the reference sets hold right now (a run's manifest marker, or the listing),
    so that --resume reruns near_dedup when a reference set changes."""
    import hashlib
    import json

    from pipeline.examples import is_table
    from stages import ingest

    parts = []
    for ref in cfg.near_dedup.references:
        fs, root = mio.filesystem(ref.path, cfg.storage)
        if mio.is_committed(fs, mio.join(root, "curated")):
            parts.append(json.dumps(mio.read_marker(fs, mio.join(root, "curated")), sort_keys=True))
        elif is_table(ref.path):
            parts.append(str(fs.info(root).get("size")) + str(fs.info(root).get("mtime", "")))
        else:
            try:
                parts.append("\n".join(ingest.list_prefix(ref.path, cfg.storage, cfg.input.extensions)))
            except (OSError, ValueError) as e:
                raise ConfigError(f"near_dedup.references: cannot list {ref.path}: {e}") from None
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16] if parts else ""


def near_dedup_dataset(cfg: PipelineConfig, narrow: ray.data.Dataset, embeddings: ray.data.Dataset | None,
                       plan=None, device: str = "cpu", prior: np.ndarray | None = None,
                       ) -> tuple[ray.data.Dataset, dict, pa.Table]:
    """The narrow table with near-duplicates rejected; the report; the pairs table.
    ``plan``: the dedup model (``embeddings`` its table: id, embedding), None: perceptual only.
    ``prior`` (a refresh): sorted sha256 keys of images a previous run kept; they come
    first in their groups."""
    c = cfg.near_dedup
    model = plan.name if plan is not None and c.semantic and embeddings is not None else None
    report: dict = {}
    if model:
        threshold, note = snd.semantic_threshold(cfg)
        if threshold is None:
            model, report["semantic_skipped"] = None, note
    alive = narrow.map_batches(snd.alive_keyed, batch_format="pyarrow").materialize()
    n = alive.count()
    report["alive"] = n
    refs, refmap, report["references"] = reference_sets(cfg, plan if model else None, device)
    n_ref = len(refs) if refs is not None else 0
    found = []
    if c.perceptual and n + n_ref > 1:
        hashed = alive.select_columns(["_key", "phash"])
        if n_ref:
            hashed = hashed.union(ray.data.from_arrow(refs.select(["_key", "phash"])))
        (a, b, h), report["perceptual"] = perceptual_pairs(cfg, hashed, n + n_ref)
        found.append(("perceptual", a, b, h))
    if model and n + n_ref > 1:
        rows = joins.join(embeddings, alive.select_columns(["id", "_key"]), "id", "inner",
                          cfg.run.broadcast_join_mb, rows_hint=n)
        if n_ref:
            with_vec = refs.filter(pc.is_valid(refs["embedding"])).select(["id", "_key", "embedding"])
            rows = rows.union(ray.data.from_arrow(with_vec))
        rows = rows.materialize()  # read twice below
        (a, b, s), report["semantic"] = semantic_pairs(cfg, rows, n + n_ref, model, threshold)
        found.append(("semantic", a, b, s))
    all_a = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.uint64)
    all_b = np.concatenate([f[2] for f in found]) if found else np.zeros(0, np.uint64)
    nodes, roots = kn.connected_components(all_a, all_b)
    root = dict(zip(nodes.tolist(), roots.tolist()))
    edges: dict[int, list] = {}
    for kind, a, b, s in found:
        for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
            for node in (x, y):
                e = edges.setdefault(node, [None, None])
                if kind == "perceptual":
                    e[0] = int(v) if e[0] is None else min(e[0], int(v))
                else:
                    e[1] = float(v) if e[1] is None else max(e[1], float(v))
    names = alive.schema().names
    quality = "aesthetic" if c.quality_column == "auto" and "aesthetic" in names else (
        "q_blur" if c.quality_column == "auto" else c.quality_column)
    quality = quality if quality in names else None
    licence = resolve_column(names, c.licence_column, ("license", "licence", "License"), "near_dedup.licence_column")
    taxon = resolve_column(names, c.taxon_column, TAXON_COLUMNS, "near_dedup.taxon_column")
    columns = [col for col in dict.fromkeys(["width", "height", "sha256", quality, licence, taxon]) if col]
    members = np.asarray(nodes, dtype=np.uint64)
    if len(members):
        ref = ray.put(members)
        member_table = pa.concat_tables([t for t in alive.map_batches(
            _members, batch_format="pyarrow", fn_kwargs={"members": ref, "columns": columns}).iter_batches(
            batch_format="pyarrow", batch_size=None)])
        ref_groups: dict = {}
        for k, (name, rid) in refmap.items():
            if k in root:
                ref_groups.setdefault(root[k], (name, rid))
        decisions = snd.decide_groups(member_table, root, {k: tuple(v) for k, v in edges.items()}, cfg.run.seed, quality,
                                      licence, c.permissive, taxon, ref_groups, prior)
    else:
        decisions = None
    id_of = {k: f"{name}:{rid}" for k, (name, rid) in refmap.items()}
    if decisions is not None:
        id_of.update(zip(member_table["_key"].to_pylist(), member_table["id"].to_pylist()))
    pair_rows = {"group": [], "id_a": [], "id_b": [], "detector": [], "similarity": []}
    for kind, a, b, s in found:
        for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
            pair_rows["group"].append(f"{root[x]:016x}")
            pair_rows["id_a"].append(id_of.get(x))
            pair_rows["id_b"].append(id_of.get(y))
            pair_rows["detector"].append(kind)
            pair_rows["similarity"].append(float(1 - v / 64) if kind == "perceptual" else float(v))
    pairs_table = pa.table({"group": pa.array(pair_rows["group"], pa.string()),
                            "id_a": pa.array(pair_rows["id_a"], pa.string()),
                            "id_b": pa.array(pair_rows["id_b"], pa.string()),
                            "detector": pa.array(pair_rows["detector"], pa.string()),
                            "similarity": pa.array(pair_rows["similarity"], pa.float32())})
    report.update({"groups": int(len(set(roots.tolist()))), "members": int(len(members)),
                   "removed": int(sum(r is not None for r in decisions["_nd_reason"].to_pylist())) if decisions else 0,
                   "taxonomy_conflicts": int(len({g for g, f in zip(decisions["_nd_group"].to_pylist(),
                                                                    decisions["_nd_conflict"].to_pylist()) if f}))
                   if decisions else 0,
                   "keep_policy": {"licence_column": licence, "quality_column": quality, "taxon_column": taxon,
                                   "previous_run_first": prior is not None}})
    if decisions is None:
        out = narrow.map_batches(snd.apply_decisions, batch_format="pyarrow")
    else:
        out = joins.join(narrow, decisions, "id", "left_outer", cfg.run.broadcast_join_mb, rows_hint=n).map_batches(
            snd.apply_decisions, batch_format="pyarrow")
    return out, report, pairs_table


def _members(batch: pa.Table, members, columns: list[str]) -> pa.Table:
    from pipeline.joins import resolve_ref

    return snd.member_rows(batch, resolve_ref(members), columns)
