"""Diversity sampling on Ray Data, among the rows alive after near-duplicate removal.

1. fit: ``sample.sample_size`` rows drawn by hash(seed, id), sorted by id, go to one Ray
   task (a GPU when the run has one) that fits the hierarchical k-means: the same sample in
   the same order whatever the block layout, and one process, so the fit is deterministic.
2. assign: every row's clusters in ``map_batches`` (bf16 screen + float64 check, a row's
   result independent of its batch); a narrow table (ids, clusters, rank, taxon), never the
   embeddings, goes on.
3. taxonomy (optional): a hash shuffle on the taxon marks the rows within each taxon's cap
   and minimum.
4. allocate: leaf counts are summed in the driver (one number per cluster) and the target
   is water-filled top-down through the levels.
5. pick: a hash shuffle on the leaf cluster chooses each leaf's rows; the decisions are
   joined back to the narrow table by id.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray

from manifests.config import TAXON_COLUMNS, PipelineConfig, resolve_column
from manifests.schema import Stage
from pipeline import embedding, joins, refresh
from pipeline.stage import Context, StageDef
from stages import near_dedup as snd
from stages import sample as ssa
from stages.kernels import sampling as ks

ROWS_PER_PARTITION = 250_000  # narrow rows per hash-shuffle partition


def auto_levels(n: int) -> list[int]:
    """Clusters per level for ``n`` rows: n/100, n/5000, n/50000 (about the reference's
    5.6M -> 60000/1200/120), levels under 2 clusters dropped (one level at least)."""
    out = []
    for per in (100, 5000, 50000):
        k = int(round(n / per))
        if k >= 2 and (not out or k < out[-1]):
            out.append(k)
    return out or [max(1, min(n, 2))]


def _fit(x: np.ndarray, levels: list[int], cfg_sample, seed: int, device: str, threads: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)  # Ray sets one thread per CPU asked; this task asked for a node's worth
    points = cfg_sample.resample_points or [10, 5] + [3] * max(0, len(levels) - 2)
    return ks.fit_levels(x, levels, iters=cfg_sample.iters, seed=seed, method=cfg_sample.method,
                         resample_points=(points + [points[-1]] * len(levels))[: len(levels)],
                         resample_steps=cfg_sample.resample_steps, device=device if device == "cuda" else None,
                         n_init=cfg_sample.n_init)


def node_cpus(cap: int = 16) -> int:
    """CPUs of the largest alive node (at most ``cap``): the one-process fit asks for them all."""
    cpus = [n.get("Resources", {}).get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
    return int(max(1, min(cap, max(cpus or [1]))))


def fit_sample(cfg: PipelineConfig, rows: ray.data.Dataset, n: int, device: str) -> tuple[list[dict], dict]:
    """The hierarchical k-means fitted on the hash sample of ``rows`` (id, embedding)."""
    c = cfg.sample
    cutoff = min(2**64 - 1, int(c.sample_size / max(1, n) * 2**64))
    got = rows.map_batches(snd.sample_rows, batch_format="pyarrow",
                           fn_kwargs={"seed": cfg.run.seed, "cutoff": cutoff}).take_all()
    got.sort(key=lambda r: r["id"])
    x = np.asarray([r["embedding"] for r in got], dtype=np.float32)
    levels = [int(min(k, max(1, len(x)))) for k in (c.levels or auto_levels(n))]
    levels = [k for i, k in enumerate(levels) if i == 0 or k < levels[i - 1]]  # strictly decreasing
    threads = node_cpus()
    resources = {"num_gpus": 1, "num_cpus": 1} if device == "cuda" else {"num_cpus": threads}
    task = ray.remote(**resources)(_fit)
    fitted = ray.get(task.remote(x, levels, c, cfg.run.seed, device, threads))
    report = {"sample": len(x), "levels": levels, "method": c.method, "iters": c.iters,
              "inertia_on_sample": [round(lv["inertia"], 5) for lv in fitted]}
    return fitted, report


def sample_dataset(cfg: PipelineConfig, narrow: ray.data.Dataset, embeddings: ray.data.Dataset,
                   model: str, device: str = "cpu", levels_given: list[dict] | None = None,
                   ) -> tuple[ray.data.Dataset, dict, pa.Table]:
    """The narrow table with cluster ids per level, ``sampled``, and ``not_sampled`` rejects;
    the report; the centroids table (level, cluster, parent, centroid). ``levels_given``:
    fitted levels to assign to instead of fitting (a refresh reusing its previous centroids)."""
    c = cfg.sample
    alive = narrow.map_batches(snd.alive_keyed, batch_format="pyarrow").materialize()
    n = alive.count()
    target = int(c.target if c.target is not None else round(c.fraction * n))
    report: dict = {"model": model, "alive": n, "target": target}
    if n == 0:
        return narrow.map_batches(ssa.apply_sample, batch_format="pyarrow", fn_kwargs={"levels": 0}), report, None
    taxon = resolve_column(alive.schema().names, c.taxon_column, TAXON_COLUMNS, "sample.taxon_column")
    parts = joins.shuffle_partitions(n, ROWS_PER_PARTITION)
    keep = ["id"] + ([taxon] if taxon else [])
    # the alive ids are the small side: broadcast them, each embedding batch keeps its alive rows
    rows = joins.join(embeddings, alive.select_columns(keep), "id", "inner", cfg.run.broadcast_join_mb,
                      rows_hint=n).materialize()
    if levels_given is not None:
        fitted = levels_given
        report.update({"levels": [len(lv["centroids"]) for lv in fitted], "method": "previous centroids"})
    else:
        fitted, fit_report = fit_sample(cfg, rows, n, device)
        report.update(fit_report)
    levels = len(fitted)
    remote = ({"num_gpus": cfg.embed.num_gpus, "compute": ray.data.ActorPoolStrategy(size=cfg.embed.concurrency)}
              if device == "cuda" else
              {"num_cpus": 1, "compute": ray.data.ActorPoolStrategy(size=cfg.run.concurrency or cfg.run.num_cpus or 2)})
    assigned = rows.map_batches(ssa.AssignLevels, batch_format="pyarrow", batch_size=c.batch_size,
                                fn_constructor_kwargs={"levels": fitted, "seed": cfg.run.seed, "taxon": taxon,
                                                       "parts": parts, "device": device}, **remote)
    capped = bool(taxon) and (c.max_per_taxon is not None or c.min_per_taxon is not None)
    if capped:
        assigned = joins.map_groups(assigned, "_tpart", ssa.taxon_flags, parts,
                                    {"cap": c.max_per_taxon, "minimum": c.min_per_taxon})
    assigned = assigned.materialize()
    k = len(fitted[0]["centroids"])
    sizes, eligible, reserved = (np.zeros(k, np.int64) for _ in range(3))
    for r in assigned.map_batches(ssa.leaf_counts, batch_format="pyarrow", fn_kwargs={"k": k}).take_all():
        sizes += np.asarray(r["rows"], np.int64)
        eligible += np.asarray(r["eligible"], np.int64)
        reserved += np.asarray(r["reserved"], np.int64)
    ups = [lv["up"] for lv in fitted[:-1]]
    alloc = ks.allocate(eligible, ups, target, reserved, tie_seed=cfg.run.seed)
    decisions = joins.map_groups(assigned, "_lpart", _pick_rows, parts,
                                 {"alloc": ray.put(alloc), "eligible_counts": ray.put(eligible), "pick": c.pick,
                                  "levels": levels})
    out = joins.join(narrow, decisions, "id", "left_outer", cfg.run.broadcast_join_mb, rows_hint=n).map_batches(
        ssa.apply_sample, batch_format="pyarrow", fn_kwargs={"levels": levels})
    chosen = int(alloc.sum())
    report.update({
        "clustered": int(sizes.sum()), "unclustered_without_embedding": int(n - sizes.sum()),
        "selected": chosen, "not_sampled": int(sizes.sum()) - chosen,
        "leaf_size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        "leaf_allocation": {"min": int(alloc.min()), "median": float(np.median(alloc)), "max": int(alloc.max()),
                            "leaves_taken_whole": int(((alloc == eligible) & (alloc > 0)).sum())},
        "pick": c.pick,
        "taxonomy": ({"column": taxon, "max_per_taxon": c.max_per_taxon, "min_per_taxon": c.min_per_taxon,
                      "over_cap": int(sizes.sum() - eligible.sum()), "reserved": int(reserved.sum())}
                     if capped else {"column": taxon}),
    })
    return out, report, centroid_table(fitted)


def _pick_rows(group: pa.Table, alloc, eligible_counts, **kw) -> pa.Table:
    return ssa.pick_rows(group, joins.resolve_ref(alloc), joins.resolve_ref(eligible_counts), **kw)


def centroid_table(fitted: list[dict]) -> pa.Table:
    """level (1 = leaves), cluster, parent (its cluster one level up, -1 at the top), centroid."""
    level, cluster, parent, vecs = [], [], [], []
    for li, lv in enumerate(fitted):
        cent = np.asarray(lv["centroids"], dtype=np.float32)
        up = lv.get("up")
        level += [li + 1] * len(cent)
        cluster += list(range(len(cent)))
        parent += (up.tolist() if up is not None else [-1] * len(cent))
        vecs.append(cent)
    dim = vecs[0].shape[1]
    flat = np.concatenate([v.ravel() for v in vecs])
    return pa.table({"level": pa.array(level, pa.int32()), "cluster": pa.array(cluster, pa.int32()),
                     "parent": pa.array(parent, pa.int32()),
                     "centroid": pa.FixedSizeListArray.from_arrays(pa.array(flat), dim)})


# --------------------------------------------------------------------------- the stage

def _build(ctx: Context, out):
    splan = ctx.plan_of("sample")
    embs = ctx.read(embedding.table_name(splan)).select_columns(["id", "embedding"])
    levels, why = refresh.previous_levels(ctx.cfg, ctx.prev, splan.model_id) if ctx.prev is not None else (None, None)
    ds, counts, centroids = sample_dataset(ctx.cfg, ctx.rd.read(ctx.upstream), embs, splan.name, ctx.device, levels)
    if ctx.prev is not None:
        counts["previous_centroids"] = why
    if centroids is not None:
        ctx.rd.write(ray.data.from_arrow(centroids), ctx.path("sample.centroids"),
                     {"fingerprint": ctx.fingerprints[out.name], "model_id": splan.model_id})
    return ds, counts


def _describe(ctx: Context) -> str:
    sc = ctx.cfg.sample
    return (f"hierarchical k-means {sc.levels or 'auto levels'} ({sc.method}) on "
            f"{ctx.cfg.embed.model_for('sample')}, target {sc.target or sc.fraction}, pick {sc.pick}  "
            "writes stages/sample, sample.centroids")


STAGE = StageDef(
    name=Stage.SAMPLE, module=__name__, sections=("sample", "run.seed"),
    doc="Diversity sample: hierarchical k-means on an embedding, the target water-filled through the levels, "
        "per-taxon caps and minimums; rows not chosen are rejects (not_sampled)",
    resources="one fit task (GPU when there is one), then CPU tasks and hash shuffles",
    enabled=lambda ctx: ctx.cfg.sample.active and bool(ctx.plans), build=_build, describe=_describe,
    extra=lambda ctx, out: {"model": ctx.cfg.embed.model_for("sample"),
                            "refresh": refresh.refresh_fingerprint(ctx.cfg, ctx.prev)},
    summary=lambda ctx: {"sample": ctx.built("sample")})
