"""Near-duplicate removal on Ray Data, among the rows alive after the filters.

1. perceptual: every alive row emits one (bucket, pHash) row per LSH table; a hash shuffle
   on the bucket's partition brings bucket mates together; pairs within the Hamming radius
   are verified exactly. Tables follow from the recall target at the radius.
2. semantic: spherical k-means on a sample drawn by hash(seed, id) (one process: a
   deterministic fit); every row joins its m nearest partitions (m calibrated for the
   recall target at the threshold); partition sizes are counted first and a partition
   above ``max_block`` rows is compared block pair by block pair; pairs at cosine >=
   threshold are verified exactly inside each group.
3. the pairs (a spanning forest per detector: a few per duplicate, not per row) become
   groups by union-find in the driver; the members' keep-policy columns, pHashes and
   embeddings are fetched, and each group is decided whole (``near_dedup.policy``; direct:
   a row is removed only when it matches a kept row itself, recomputed exactly inside the
   group), in the driver or, above ``decide_in_driver`` rows, in tasks after a shuffle by
   group; the decisions are joined back to the narrow table by id.

Memory per worker is bounded by a shuffle partition / two blocks / one group, never by the
corpus; the driver holds the pair graph (proportional to the duplicates found).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from manifests import io as mio
from manifests.config import TAXON_COLUMNS, ConfigError, PipelineConfig, resolve_column
from manifests.schema import Stage
from pipeline import embedding, joins, refresh
from pipeline.stage import Context, StageDef
from stages import near_dedup as snd
from stages.kernels import kmeans
from stages.kernels import near_dedup as kn

ROWS_PER_PARTITION = 2_000_000  # shuffle partitions of the perceptual band rows


def _take_pairs(ds: ray.data.Dataset, matched: bool | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs a dataset of pair tables holds (with ``matched``: only those so marked)."""
    parts = [t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None) if len(t)] \
        if isinstance(ds, ray.data.Dataset) else [ds]
    parts = [t.filter(pc.equal(t["matched"], matched)) if matched is not None else t for t in parts]
    parts = [t for t in parts if len(t)]
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
    pairs = joins.map_groups(rows, "part", snd.hamming_partition, min(parts, 200), {"max_hamming": c.max_hamming})
    a, b, h = _take_pairs(pairs)
    a, b, h = kn.spanning_pairs(*kn.unique_pairs(a, b, h))
    params.update({"partitions": parts, "pairs": int(len(a))})
    return (a, b, h), params


def semantic_pairs(cfg: PipelineConfig, rows: ray.data.Dataset, n: int, model: str,
                   threshold: float) -> tuple[tuple, dict, tuple, np.ndarray | None]:
    """``rows``: alive rows with ``_key`` and the dedup model's ``embedding``. Returns the
    spanning forest of the pairs at the threshold, the report, the near misses (pairs
    within ``report_margin`` below it, at most two per row) and the centring mean."""
    c = cfg.near_dedup
    cutoff = min(2**64 - 1, int(c.sample_size / max(1, n) * 2**64))
    got = rows.map_batches(snd.sample_rows, batch_format="pyarrow",
                           fn_kwargs={"seed": cfg.run.seed, "cutoff": cutoff}).take_all()
    empty = (np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32))
    if len(got) < 2:
        return empty, {"threshold": threshold, "pairs": 0, "sample": len(got)}, empty, None
    # the same sample in the same order whatever the blocks (with flip an id has two rows)
    got.sort(key=lambda r: (r["id"], np.asarray(r["embedding"], dtype=np.float32).tobytes()))
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
    scratch = mio.join(root, "stages", "near_dedup.scratch")
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
            fn_kwargs={"root": mio.to_uri(fs, scratch), "storage": cfg.storage, "threshold": threshold,
                       "low": threshold - c.report_margin if c.report_margin > 0 else None})
        got = pa.concat_tables([t for t in pairs.iter_batches(batch_format="pyarrow", batch_size=None) if len(t)]
                               or [snd.PAIR_SCHEMA.empty_table().append_column("matched", pa.array([], pa.bool_()))])
    finally:
        fs.rm(scratch, recursive=True)
    a, b, s = kn.spanning_pairs(*kn.unique_pairs(*_take_pairs(got, True), keep_max=True), keep_max=True)
    near = kn.top_pairs(*_take_pairs(got, False), 2)
    report = {"model": model, "threshold": threshold, "centred": c.center, "sample": len(xs), "partitions": k,
              "coarse_cells": len(partition.coarse),
              "kmeans_mean_cosine_distance": round(inertia, 5), "assign": m,
              "boundary_recall_at_threshold": {str(i): round(v, 4) for i, v in curve.items()},
              "largest_partition": int(counts.max()), "blocked_partitions": int((packing["blocks"] > 1).sum()),
              "buckets": int(packing["bucket"].max()) + 1, "tasks": len(packing["tasks"]), "pairs": int(len(a)),
              "near_misses": int(len(near[0])), "report_margin": c.report_margin}
    return (a, b, s), report, near, mean


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
                from pipeline.embedding import table_names

                stage = next((mio.join(root, "stages", n) for n in table_names(plan)
                              if mio.is_committed(fs, mio.join(root, "stages", n))), mio.join(root, "stages", "-"))
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
                       flips: ray.data.Dataset | None = None) -> tuple[ray.data.Dataset, dict, pa.Table]:
    """The narrow table with near-duplicates rejected; the report; the pairs table.
    ``plan``: the dedup model (``embeddings`` its table: id, embedding), None: perceptual only.
    ``flips`` (``near_dedup.flip``): the same model's embeddings of the mirrored images;
    each row then takes part twice in the semantic search (as itself and mirrored), and a
    pair's similarity is the larger one.
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
    found, near, mean, rows = [], None, None, None
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
        if flips is not None:
            mirrored = joins.join(flips, alive.select_columns(["id", "_key"]), "id", "inner",
                                  cfg.run.broadcast_join_mb, rows_hint=n)
            rows = rows.union(mirrored.select_columns(rows.schema().names))
        rows = rows.materialize()  # read twice below
        n_rows = (2 * n if flips is not None else n) + n_ref  # with flip every row is there twice
        (a, b, s), report["semantic"], near, mean = semantic_pairs(cfg, rows, n_rows, model, threshold)
        found.append(("semantic", a, b, s))
    all_a = np.concatenate([f[1] for f in found]) if found else np.zeros(0, np.uint64)
    all_b = np.concatenate([f[2] for f in found]) if found else np.zeros(0, np.uint64)
    nodes, roots = kn.connected_components(all_a, all_b)
    names = alive.schema().names
    quality = "aesthetic" if c.quality_column == "auto" and "aesthetic" in names else (
        "q_blur" if c.quality_column == "auto" else c.quality_column)
    quality = quality if quality in names else None
    licence = resolve_column(names, c.licence_column, ("license", "licence", "License"), "near_dedup.licence_column")
    taxon = resolve_column(names, c.taxon_column, TAXON_COLUMNS, "near_dedup.taxon_column")
    params = {"policy": c.policy, "threshold": threshold if model else None,
              "max_hamming": c.max_hamming if c.perceptual else None, "mean": mean, "flip": flips is not None,
              "seed": cfg.run.seed, "quality": quality, "licence": licence, "permissive": c.permissive, "taxon": taxon}
    decisions, where = _decide(cfg, alive, embeddings if model else None, flips if model else None, refs, refmap,
                               nodes, roots, params, prior,
                               [col for col in dict.fromkeys(["width", "height", "sha256", "phash", quality, licence,
                                                              taxon]) if col])
    report["decided_in"] = where
    if mean is not None:  # the centring of the semantic similarities, for dedup-report (popped by the plan)
        report["_centre"] = np.asarray(mean, dtype=np.float32)
    id_of = {k: f"{name}:{rid}" for k, (name, rid) in refmap.items()}
    group_of = dict(zip(nodes.tolist(), roots.tolist()))
    pairs_table = _pairs_table(found, near, id_of, group_of, decisions, alive)
    counts = _decision_counts(decisions)
    report.update({"groups": int(len(set(roots.tolist()))), "members": int(len(nodes)),
                   "policy": c.policy, "removed": counts[c.policy],
                   "removed_by_policy": {k: counts[k] for k in ("direct", "component")},
                   "kept_in_groups": counts["kept_in_groups"], "undecided": counts["undecided"],
                   "taxonomy_conflicts": counts["taxonomy_conflicts"],
                   "keep_policy": {"licence_column": licence, "quality_column": quality, "taxon_column": taxon,
                                   "previous_run_first": prior is not None}})
    warnings = []
    if model and decisions is not None:
        sem = decisions.filter(pc.equal(decisions["_nd_reason"], "semantic_duplicate"))
        line = snd.margin_warning(sem["_nd_similarity"].to_pylist(), threshold)
        if line:
            warnings.append(line)
    if c.policy == "component" and counts["component"] > counts["direct"]:
        warnings += [
            f"near_dedup: policy component removed {counts['component'] - counts['direct']} rows that match no kept "
            f"row directly (only through their group); policy direct would keep them ({counts['direct']} removed)"]
    if warnings:
        report["warnings"] = warnings
    if decisions is None:
        out = narrow.map_batches(snd.apply_decisions, batch_format="pyarrow")
    else:
        out = joins.join(narrow, decisions, "id", "left_outer", cfg.run.broadcast_join_mb, rows_hint=n).map_batches(
            snd.apply_decisions, batch_format="pyarrow")
    return out, report, pairs_table


def _decide(cfg: PipelineConfig, alive: ray.data.Dataset, rows: ray.data.Dataset | None,
            flips: ray.data.Dataset | None, refs: pa.Table | None, refmap: dict, nodes: np.ndarray,
            roots: np.ndarray, params: dict, prior, columns: list[str]):
    """Every group's decisions (``snd.decide_groups``): in the driver when the groups hold
    at most ``near_dedup.decide_in_driver`` rows, else one task per shuffle partition of
    the groups (a group is never split: it is decided whole, inside its task)."""
    if len(nodes) == 0:
        return None, None
    nodes = np.asarray(nodes, dtype=np.uint64)
    roots = np.asarray(roots, dtype=np.uint64)
    ref = ray.put((nodes, roots))
    members = alive.map_batches(_group_rows, batch_format="pyarrow", fn_kwargs={"graph": ref, "columns": columns})
    for table, name in ((rows, "embedding"), (flips, "embedding_flip")):  # the members' embeddings (by id)
        if table is not None:
            vecs = table.map_batches(_member_vectors, batch_format="pyarrow",
                                     fn_kwargs={"graph": ref, "name": name})
            members = joins.join(members, vecs, "id", "left_outer", cfg.run.broadcast_join_mb, rows_hint=len(nodes))
    extra = None
    if refs is not None and len(refs):
        t = snd.group_rows(refs, nodes, roots, ["phash", "embedding"] if rows is not None else ["phash"])
        sets = [refmap[int(k)] for k in t["_key"].to_pylist()]
        extra = (t.append_column("_ref_set", pa.array([a for a, _ in sets], pa.string()))
                 .append_column("_ref_id", pa.array([b for _, b in sets], pa.string())))
    if len(nodes) <= cfg.near_dedup.decide_in_driver:
        parts = [t for t in members.iter_batches(batch_format="pyarrow", batch_size=None) if len(t)]
        if extra is not None:
            parts.append(extra)
        table = pa.concat_tables(parts, promote_options="default") if parts else None
        return (snd.decide_groups(table, params, prior) if table is not None else None), "driver"
    if extra is not None:  # one schema for the union: corpus rows get null reference columns
        members = members.map_batches(_no_reference, batch_format="pyarrow").materialize()
        if members.count() == 0:  # only reference images are near-duplicates: no corpus row to decide
            return None, "tasks"
        schema = members.schema().base_schema
        extra = pa.table({f.name: (extra[f.name].cast(f.type) if f.name in extra.column_names
                                   else pa.nulls(len(extra), f.type)) for f in schema})
        members = members.union(ray.data.from_arrow(extra))
    parts = int(max(1, min(200, math.ceil(len(nodes) / 50_000))))
    ds = joins.map_groups(members, "_group", _decide_batch, parts, {"params": params, "prior": prior})
    return pa.concat_tables([t for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
                            or [snd.decide_groups(pa.table({"id": pa.array([], pa.string()),
                                                            "_group": pa.array([], pa.uint64())}), params)]), "tasks"


def _group_rows(batch: pa.Table, graph, columns: list[str]) -> pa.Table:
    from pipeline.joins import resolve_ref

    nodes, roots = resolve_ref(graph)
    return snd.group_rows(batch, nodes, roots, columns)


def _no_reference(batch: pa.Table) -> pa.Table:
    return (batch.append_column("_ref_set", pa.nulls(len(batch), pa.string()))
            .append_column("_ref_id", pa.nulls(len(batch), pa.string())))


def _member_vectors(batch: pa.Table, graph, name: str) -> pa.Table:
    """``id`` and the embedding (as ``name``) of the rows of an embeddings table that are
    nodes of the pair graph."""
    from pipeline.joins import resolve_ref

    nodes, _ = resolve_ref(graph)
    keys = kn.id_keys(batch["id"].to_pylist())
    _, hit = kn.sorted_lookup(nodes, keys)
    got = batch.filter(pa.array(hit))
    return pa.table({"id": got["id"], name: got["embedding"]})


def _decide_batch(rows: pa.Table, params: dict, prior) -> pa.Table:
    return snd.decide_groups(rows, params, prior)


def _decision_counts(decisions: pa.Table | None) -> dict:
    if decisions is None or len(decisions) == 0:
        return {"direct": 0, "component": 0, "kept_in_groups": 0, "undecided": 0, "taxonomy_conflicts": 0}
    removed = pc.is_valid(decisions["_nd_reason"])
    groups = decisions["_nd_group"].to_pylist()
    kept_groups = [g for g, r in zip(groups, removed.to_pylist()) if not r]
    return {"direct": int(pc.sum(decisions["_nd_direct_removed"]).as_py() or 0),
            "component": int(pc.sum(decisions["_nd_component_removed"]).as_py() or 0),
            "kept_in_groups": int(len(kept_groups) - len(set(kept_groups))),
            "undecided": int(pc.sum(decisions["_nd_undecided"]).as_py() or 0),
            "taxonomy_conflicts": int(len({g for g, f in zip(groups, decisions["_nd_conflict"].to_pylist()) if f}))}


def _pairs_table(found: list, near, id_of: dict, group_of: dict, decisions: pa.Table | None,
                 alive: ray.data.Dataset) -> pa.Table:
    """``stages/near_dedup.pairs``: the pairs the detectors found (``kind`` found: the
    spanning forest of each detector; near_miss: within report_margin below the semantic
    threshold) and one row per removal (``kind`` removal: the row and the kept row it
    directly matched)."""
    keys = set()
    for _, a, b, _s in found:
        keys.update(a.tolist())
        keys.update(b.tolist())
    if near is not None:
        keys.update(near[0].tolist())
        keys.update(near[1].tolist())
    keys -= set(id_of)
    if keys:
        wanted = np.unique(np.fromiter(keys, np.uint64, len(keys)))
        got = alive.map_batches(_group_rows, batch_format="pyarrow",
                                fn_kwargs={"graph": ray.put((wanted, wanted)), "columns": []})
        for t in got.iter_batches(batch_format="pyarrow", batch_size=None):
            id_of.update(zip(t["_key"].to_pylist(), t["id"].to_pylist()))
    rows = {"group": [], "id_a": [], "id_b": [], "detector": [], "similarity": [], "kind": []}

    def add(group, a, b, detector, sim, kind):
        rows["group"].append(group)
        rows["id_a"].append(a)
        rows["id_b"].append(b)
        rows["detector"].append(detector)
        rows["similarity"].append(sim)
        rows["kind"].append(kind)

    for kind, a, b, s in found:
        for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
            add(f"{group_of[x]:016x}", id_of.get(x), id_of.get(y), kind,
                float(1 - v / 64) if kind == "perceptual" else float(v), "found")
    if near is not None:
        for x, y, v in zip(near[0].tolist(), near[1].tolist(), near[2].tolist()):
            g = group_of.get(x)
            add(f"{g:016x}" if g is not None and g == group_of.get(y) else None, id_of.get(x), id_of.get(y),
                "semantic", float(v), "near_miss")
    if decisions is not None:
        removed = decisions.filter(pc.is_valid(decisions["_nd_reason"]))
        for r in removed.to_pylist():
            add(r["_nd_group"], r["id"], r["_nd_duplicate_of"],
                "perceptual" if r["_nd_reason"] == "perceptual_duplicate" else "semantic", r["_nd_similarity"],
                "removal")
    return pa.table({"group": pa.array(rows["group"], pa.string()), "id_a": pa.array(rows["id_a"], pa.string()),
                     "id_b": pa.array(rows["id_b"], pa.string()), "detector": pa.array(rows["detector"], pa.string()),
                     "similarity": pa.array(rows["similarity"], pa.float32()),
                     "kind": pa.array(rows["kind"], pa.string())})


# --------------------------------------------------------------------------- the stage

def _build(ctx: Context, out):
    cfg, rd = ctx.cfg, ctx.rd
    dplan = ctx.plan_of("dedup")
    embs = flips = None
    if dplan is not None and cfg.near_dedup.semantic:
        embs = ctx.read(embedding.table_name(dplan)).select_columns(["id", "embedding"])
        fplan = next((p for p in ctx.plans if p.flip and p.spec.name == dplan.name), None)
        if fplan is not None:
            flips = ctx.read(embedding.table_name(fplan)).select_columns(["id", "embedding"])
    prior = refresh.prior_keys(ctx.prev) if ctx.prev is not None else None
    ds, counts, pairs = near_dedup_dataset(cfg, rd.read(ctx.upstream), embs, dplan, ctx.device, prior, flips)
    centre = counts.pop("_centre", None)
    fp = ctx.fingerprints[out.name]
    rd.write(ray.data.from_arrow(pairs), ctx.path("near_dedup.pairs"), {"fingerprint": fp})
    if centre is not None:  # the mean subtracted before the semantic cosine (dedup-report recomputes pairs)
        rd.write(ray.data.from_arrow(pa.table({"model_id": [dplan.model_id], "mean": [centre.tolist()]})),
                 ctx.path("near_dedup.centre"), {"fingerprint": fp})
    return ds, counts


def _extra(ctx: Context, out) -> dict:
    return {"model": ctx.cfg.embed.model_for("dedup") if ctx.plans else None,
            "references": references_fingerprint(ctx.cfg), "refresh": refresh.refresh_fingerprint(ctx.cfg, ctx.prev)}


def _describe(ctx: Context) -> str:
    nd = ctx.cfg.near_dedup
    return (f"perceptual={nd.perceptual} (Hamming <= {nd.max_hamming}), semantic={nd.semantic} "
            f"(model {ctx.cfg.embed.model_for('dedup') if ctx.plans else None}), policy {nd.policy}  "
            "writes stages/near_dedup, near_dedup.pairs")


STAGE = StageDef(
    name=Stage.NEAR_DEDUP, module=__name__, sections=("near_dedup", "run.seed"),
    doc="Near-duplicates: pHash LSH and semantic partitions, pairs verified exactly; a row is removed only "
        "for a kept row it matches itself (policy direct); reference sets",
    resources="hash shuffles and CPU tasks; the pair graph in the driver",
    enabled=lambda ctx: ctx.cfg.near_dedup.enabled, build=_build, extra=_extra, describe=_describe,
    summary=lambda ctx: {"near_dedup": ctx.built("near_dedup")})
