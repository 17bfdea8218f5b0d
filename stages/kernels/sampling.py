"""Diversity sampling kernels: pure numpy/torch, no Ray.

* :func:`fit_levels` -- hierarchical spherical k-means (Vo et al. 2024, "Automatic Data
  Curation for Self-Supervised Learning"): level 1 clusters the rows, each higher level
  clusters the centroids of the level below; with ``method="resampled"`` each level is
  refined ``resample_steps`` times by re-fitting on the ``r`` points closest to each
  centroid (warm-started from the current centroids), which moves centroids off the dense
  modes and spreads them over the space.
* :func:`assign` -- nearest centroid of each row: a bfloat16 screen for the ``screen`` best
  candidates, then float64 scoring of those, so that a row's cluster does not depend on
  the batch it was computed in (matrix-product kernels round differently for different
  batch shapes).
* :func:`water_fill` / :func:`allocate` -- top-down allocation of a target size through
  the levels: each cluster gets min(size, max(floor, level)), the level set so the total is
  met; the integer remainder goes to clusters in a seeded order.
* :func:`taxon_quota` -- per-taxon caps and minimums, spread over the leaf clusters a taxon
  occupies (round robin by hash order), and :func:`pick` -- the rows chosen in each leaf.
"""

from __future__ import annotations

import numpy as np
import torch

from stages.kernels import kmeans


def assign(x: np.ndarray | torch.Tensor, centroids: np.ndarray, screen: int = 8, chunk: int = 2048,
           device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (cosine) of each normalized row of ``x`` and the float64 cosine.
    The bf16 screen keeps ``screen`` candidates; a row's result depends on its own vector
    only (unless more than ``screen`` centroids lie within the bf16 error of its best)."""
    xt = kmeans.normalize(x)
    c = torch.as_tensor(np.asarray(centroids), dtype=torch.float32)
    if device is not None and torch.device(device).type == "cuda":
        xt, c = xt.pin_memory().to(device, non_blocking=True), c.to(device)
    cf = c.to(torch.bfloat16)
    c64 = c.double()
    t = min(screen, len(c))
    idx = np.empty(len(xt), np.int64)
    sim = np.empty(len(xt), np.float64)
    for i in range(0, len(xt), chunk):
        part = xt[i : i + chunk]
        _, cand = torch.topk((part.to(torch.bfloat16) @ cf.T).float(), t, dim=1)
        exact = (part.double()[:, None, :] * c64[cand]).sum(dim=2)  # (rows, t) elementwise: batch-independent
        best = exact.argmax(dim=1)
        idx[i : i + chunk] = cand.gather(1, best[:, None])[:, 0].cpu().numpy()
        sim[i : i + chunk] = exact.gather(1, best[:, None])[:, 0].cpu().numpy()
    return idx, sim


def closest_per_cluster(idx: np.ndarray, sim: np.ndarray, r: int) -> np.ndarray:
    """Indices of the ``r`` rows most similar to their centroid in every cluster."""
    order = np.lexsort((-sim, idx))
    grouped = idx[order]
    start = np.searchsorted(grouped, grouped, side="left")
    return np.sort(order[np.arange(len(order)) - start < r])


def fit_levels(x: np.ndarray, levels: list[int], iters: int = 10, seed: int = 0, method: str = "resampled",
               resample_points: list[int] | None = None, resample_steps: int = 10,
               device: str | None = None, n_init: int = 1) -> list[dict]:
    """Hierarchical k-means. Returns one dict per level: ``centroids`` (k_l, d), ``assign``
    (the cluster of each point of that level: rows of ``x`` for level 1, the centroids of
    the level below above it), ``up`` (every level but the top: the next level's cluster of
    each of its clusters) and ``inertia`` (mean cosine distance of the level's points to
    their centroid). ``n_init``: seedings tried per level, the lowest inertia kept."""
    data = kmeans.normalize(x).numpy()
    out = []
    for li, k in enumerate(levels):
        k = int(max(1, min(k, len(data))))
        c, _ = min((kmeans.fit(data, k, iters=iters, seed=seed + li + 1000 * t, fast=True, device=device)
                    for t in range(max(1, n_init))), key=lambda r: r[1])
        r = (resample_points or [0] * len(levels))[li] if method == "resampled" else 0
        for step in range(resample_steps if r > 0 else 0):
            idx, sim = assign(data, c, device=device)
            picked = closest_per_cluster(idx, sim, r)
            c, _ = kmeans.fit(data[picked], k, iters=iters, seed=seed + li, init=c, fast=True,
                              device=device)
        idx, sim = assign(data, c, device=device)
        out.append({"centroids": c, "assign": idx, "inertia": float((1 - sim).mean())})
        data = c
    for li in range(len(out) - 1):  # parent of a level-l cluster: its level-(l+1) cluster
        out[li]["up"] = out[li + 1]["assign"]
    return out


def row_levels(leaf: np.ndarray, levels: list[dict]) -> np.ndarray:
    """(n, L) cluster ids per level of rows whose level-1 cluster is ``leaf``."""
    cols = [np.asarray(leaf, dtype=np.int64)]
    for lv in levels[:-1]:
        cols.append(lv["up"][cols[-1]])
    return np.stack(cols, axis=1)


def water_fill(sizes: np.ndarray, total: int, floors: np.ndarray | None = None,
               tie: np.ndarray | None = None) -> np.ndarray:
    """Integer allocation ``a_i = min(size_i, max(floor_i, level))`` summing to ``total``
    (or to sum(sizes) when that is smaller). Clusters smaller than the level get all their
    rows and the rest is shared evenly by the others; ``floors`` (clipped to sizes) are
    granted first when ``total`` allows (else the floors themselves are water-filled). The
    remainder below one row per cluster goes in ``tie`` order (default: index)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    floors = np.zeros_like(sizes) if floors is None else np.minimum(np.asarray(floors, dtype=np.int64), sizes)
    total = int(max(0, total))
    if total >= sizes.sum():
        return sizes.copy()
    if total <= floors.sum():
        return water_fill(floors, total, None, tie) if floors.sum() else np.zeros_like(sizes)

    def filled(level: int) -> int:
        return int(np.minimum(sizes, np.maximum(floors, level)).sum())

    lo, hi = 0, int(sizes.max())
    while lo < hi:  # the largest level whose allocation fits
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if filled(mid) <= total else (lo, mid - 1)
    alloc = np.minimum(sizes, np.maximum(floors, lo))
    grow = np.flatnonzero((alloc == lo) & (alloc < sizes))  # the ones that would take one more
    order = grow if tie is None else grow[np.argsort(np.asarray(tie)[grow], kind="stable")]
    alloc[order[: total - int(alloc.sum())]] += 1
    return alloc


def allocate(leaf_sizes: np.ndarray, ups: list[np.ndarray], total: int, leaf_floors: np.ndarray | None = None,
             tie_seed: int = 0) -> np.ndarray:
    """Top-down allocation of ``total`` rows to the leaf clusters. ``ups[l]`` maps each
    cluster of level l+1 (level 1 = leaves) to its cluster at level l+2. The top level is
    water-filled, then each cluster's share is water-filled among its children, down to
    the leaves."""
    sizes = [np.asarray(leaf_sizes, dtype=np.int64)]
    floors = [np.zeros_like(sizes[0]) if leaf_floors is None else np.asarray(leaf_floors, dtype=np.int64)]
    for up in ups:
        k = int(up.max()) + 1 if len(up) else 0
        sizes.append(np.bincount(up, weights=sizes[-1], minlength=k).astype(np.int64))
        floors.append(np.bincount(up, weights=floors[-1], minlength=k).astype(np.int64))
    rng = np.random.default_rng(tie_seed)
    alloc = water_fill(sizes[-1], total, floors[-1], rng.permutation(len(sizes[-1])))
    for li in range(len(ups) - 1, -1, -1):
        up = np.asarray(ups[li])
        child = np.zeros(len(up), np.int64)
        order = np.argsort(up, kind="stable")
        bounds = np.searchsorted(up[order], np.arange(len(alloc) + 1))
        tie = rng.permutation(len(up))
        for p in np.flatnonzero(alloc):
            kids = order[bounds[p] : bounds[p + 1]]
            child[kids] = water_fill(sizes[li][kids], int(alloc[p]), floors[li][kids], tie[kids])
        alloc = child
    return alloc


def taxon_quota(taxon: np.ndarray, leaf: np.ndarray, rank: np.ndarray, cap: int | None,
                minimum: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Which rows a taxon may contribute (``eligible``: at most ``cap`` per taxon) and which
    it must (``reserved``: its first ``minimum``). A taxon's rows are ordered round robin over
    the leaf clusters it occupies (each leaf's rows by ``rank``), so a capped taxon keeps its
    variety. ``taxon``: integer codes, -1 for unknown (never capped nor reserved); all rows
    of a taxon must be present."""
    taxon = np.asarray(taxon, dtype=np.int64)
    n = len(taxon)
    order = np.lexsort((np.asarray(rank, dtype=np.uint64), np.asarray(leaf), taxon))
    t_s, l_s = taxon[order], np.asarray(leaf)[order]
    new_group = np.r_[True, (t_s[1:] != t_s[:-1]) | (l_s[1:] != l_s[:-1])]
    starts = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))
    within_leaf = np.arange(n) - starts  # position inside (taxon, leaf) by rank
    rank_s = np.asarray(rank, dtype=np.uint64)[order]
    by_taxon = np.lexsort((rank_s, within_leaf, t_s))
    t2 = t_s[by_taxon]
    t_start = np.maximum.accumulate(np.where(np.r_[True, t2[1:] != t2[:-1]], np.arange(n), 0))
    position = np.empty(n, np.int64)
    position[order[by_taxon]] = np.arange(n) - t_start
    known = taxon >= 0
    eligible = ~known | (position < (cap if cap is not None else n + 1))
    reserved = known & (position < (minimum or 0)) & eligible
    return eligible, reserved


def pick(leaf: np.ndarray, key: np.ndarray, eligible: np.ndarray, reserved: np.ndarray,
         alloc: np.ndarray) -> np.ndarray:
    """Rows chosen in each leaf: its ``alloc[leaf]`` first eligible rows, reserved rows
    first, then by ``key`` (hash(seed, id), or distance to the centroid). All rows of a leaf
    must be present."""
    leaf = np.asarray(leaf, dtype=np.int64)
    n = len(leaf)
    order = np.lexsort((np.asarray(key), ~np.asarray(reserved, bool), ~np.asarray(eligible, bool), leaf))
    l_s = leaf[order]
    start = np.searchsorted(l_s, l_s, side="left")
    chosen = np.zeros(n, bool)
    chosen[order] = (np.arange(n) - start < np.asarray(alloc)[l_s]) & np.asarray(eligible, bool)[order]
    return chosen


def label_entropy(labels: np.ndarray, classes: int | None = None) -> float:
    """Normalized entropy (0..1) of a label distribution over ``classes`` labels (default:
    the labels present): 1 when every label is equally common. Compare samples with the
    corpus's class count, so that a sample missing classes is not flattered."""
    _, counts = np.unique(np.asarray(labels), return_counts=True)
    k = classes or len(counts)
    if k <= 1 or len(counts) == 0:
        return 0.0
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum() / np.log(k))
