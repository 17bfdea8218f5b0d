"""Spherical k-means (cosine) on L2-normalized embeddings: pure torch, no Ray, one process,
deterministic for a seed (fixed init draws, fixed reduction order on the CPU).

Used by near-duplicate removal (partition the embedding space, then compare pairs inside
each partition, as SemDeDup does) and by diversity sampling (hierarchical levels)."""

from __future__ import annotations

import numpy as np
import torch


def normalize(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float32)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _best(x: torch.Tensor, c: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid (max cosine) per row, and its similarity (in ``x``'s dtype: a
    bfloat16 ``x`` makes the products several times faster, for Lloyd steps)."""
    idx = torch.empty(len(x), dtype=torch.int64, device=x.device)
    sim = torch.empty(len(x), dtype=torch.float32, device=x.device)
    c = c.to(x.dtype)
    for i in range(0, len(x), chunk):
        s, j = (x[i : i + chunk] @ c.T).float().max(dim=1)
        idx[i : i + chunk], sim[i : i + chunk] = j, s
    return idx, sim


def kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator, candidates: int | None = None) -> torch.Tensor:
    """Greedy k-means++ seeding on cosine distance: each new centroid is the best of
    ``candidates`` draws (default 2 + ln k, as scikit-learn and pt-kmeans) proportional to
    the distance to the nearest chosen centroid. Distances from bfloat16 products."""
    n = len(x)
    candidates = candidates or 2 + int(np.log(max(k, 1)))
    xb = x.to(torch.bfloat16)
    first = int(torch.randint(n, (1,), generator=gen))
    chosen = [first]
    dist = (1.0 - (xb @ xb[first]).float()).clamp_min(0)
    for _ in range(1, k):
        total = float(dist.sum())
        if total <= 0:  # fewer distinct points than k: repeat (empty clusters stay empty)
            chosen.append(int(torch.randint(n, (1,), generator=gen)))
            continue
        picks = torch.multinomial(dist / total, candidates, replacement=True, generator=gen)
        new = (1.0 - (xb @ xb[picks].T).float()).clamp_min(0)  # (n, candidates)
        pot = torch.minimum(new, dist[:, None]).sum(dim=0)
        best = int(pot.argmin())
        chosen.append(int(picks[best]))
        dist = torch.minimum(dist, new[:, best])
    return x[chosen].clone()


def fit(x: np.ndarray, k: int, iters: int = 20, seed: int = 0, init_sample: int = 50,
        init: np.ndarray | None = None, fast: bool = False, device: str | None = None) -> tuple[np.ndarray, float]:
    """Spherical k-means: ``k`` unit centroids of the rows of ``x`` and the mean cosine
    distance of the rows to their centroid. k-means++ seeding on at most ``init_sample * k``
    rows (drawn with the seed), or ``init`` centroids; Lloyd iterations on all rows (with
    ``fast``, assignments from bfloat16 products; centroid sums in float32) on ``device``
    (seeding on the CPU)."""
    xt = normalize(x)
    n = len(xt)
    gen = torch.Generator().manual_seed(seed)
    if init is not None:
        c = normalize(init)
        k = len(c)
    else:
        k = max(1, min(k, n))
        sub = xt if n <= init_sample * k else xt[torch.randperm(n, generator=gen)[: init_sample * k]]
        c = kmeans_pp(sub, k, gen)
    if device is not None:
        xt, c = xt.to(device), c.to(device)
    xl = xt.to(torch.bfloat16) if fast else xt
    for _ in range(iters):
        idx, _ = _best(xl, c)
        sums = torch.zeros_like(c).index_add_(0, idx, xt)
        counts = torch.bincount(idx, minlength=k)
        empty = counts == 0
        new = torch.where(empty[:, None], c, sums)
        new = normalize(new)
        if torch.equal(new, c):
            break
        c = new
    _, sim = _best(xt, c)
    return c.cpu().numpy(), float((1.0 - sim).mean())


def top_m(x: np.ndarray, centroids: np.ndarray, m: int, chunk: int = 16384,
          fast: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The ``m`` most similar centroids of each (normalized) row, and the similarities
    (``fast``: from bfloat16 products)."""
    xt, c = normalize(x), torch.as_tensor(centroids, dtype=torch.float32)
    if fast:
        xt, c = xt.to(torch.bfloat16), c.to(torch.bfloat16)
    m = min(m, len(c))
    idx = np.empty((len(xt), m), dtype=np.int64)
    sim = np.empty((len(xt), m), dtype=np.float32)
    for i in range(0, len(xt), chunk):
        s, j = torch.topk((xt[i : i + chunk] @ c.T).float(), m, dim=1)
        idx[i : i + chunk], sim[i : i + chunk] = j.numpy(), s.numpy()
    return idx, sim


class Partition:
    """Spherical k-means for partitioning many rows: flat, or for very many partitions two
    levels, ``coarse`` centroids and ``fine`` centroids fitted inside each coarse cell
    (``parent`` names the cell; flat: coarse = fine). With two levels a row is
    compared with the coarse centroids, then with the children of its ``probe`` nearest
    cells only (a quarter of the cells, at least 3): about sqrt(k) + k / 4 dot products per
    row instead of k (fewer probes lose neighbours across coarse boundaries)."""

    def __init__(self, coarse: np.ndarray, fine: np.ndarray, parent: np.ndarray):
        self.coarse, self.fine, self.parent = coarse, fine, np.asarray(parent, dtype=np.int64)
        self.probe = max(3, -(-len(coarse) // 4))
        self.children = [np.flatnonzero(self.parent == c) for c in range(len(coarse))]

    @property
    def k(self) -> int:
        return len(self.fine)

    @classmethod
    def fit(cls, x: np.ndarray, k: int, iters: int = 10, seed: int = 0,
            flat_max: int = 20_000) -> tuple["Partition", float]:
        """Flat k-means up to ``flat_max`` partitions (every row then meets every centroid,
        in bfloat16); two levels above. Two levels cost neighbours: on the bench's data
        (4,000 partitions), a pair at cosine 0.75 shares one of its 3 nearest partitions
        99.75% of the time with flat k-means, 95% with two levels and a quarter of the cells
        probed, 98.9% with every cell probed (the fine centroids, fitted inside coarse
        cells, fit worse)."""
        xt = normalize(x).numpy()
        k = max(1, min(k, len(xt)))
        k1 = int(np.ceil(np.sqrt(k)))
        if k1 <= 1 or k <= max(16, flat_max):
            c, inertia = fit(xt, k, iters=iters, seed=seed, fast=True)
            return cls(c, c, np.arange(len(c))), inertia
        coarse, _ = fit(xt, k1, iters=iters, seed=seed)
        top, _ = top_m(xt, coarse, 1)
        cell = top[:, 0]
        share = np.bincount(cell, minlength=k1)
        fine, parent, dist = [], [], 0.0
        for c in range(k1):
            if share[c] == 0:
                continue
            kc = max(1, int(round(k * share[c] / len(xt))))
            f, inertia = fit(xt[cell == c], kc, iters=iters, seed=seed + c + 1)
            fine.append(f)
            parent += [c] * len(f)
            dist += inertia * share[c]
        return cls(coarse, np.concatenate(fine), np.array(parent)), dist / len(xt)

    def assign(self, x: np.ndarray, m: int, probe: int | None = None,
               chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
        """The ``m`` nearest fine centroids of each row among the children of its ``probe``
        nearest coarse cells (all centroids when there is one level)."""
        xt = normalize(x)
        if len(self.coarse) == len(self.fine) and np.array_equal(self.parent, np.arange(len(self.fine))):
            return top_m(xt, self.fine, m, fast=True)
        cells, _ = top_m(xt, self.coarse, min(probe or self.probe, len(self.coarse)))
        f = torch.as_tensor(self.fine, dtype=torch.float32)
        m = min(m, len(self.fine))
        idx = np.empty((len(xt), m), dtype=np.int64)
        sim = np.empty((len(xt), m), dtype=np.float32)
        for i in range(0, len(xt), chunk):  # a dense (rows, k) block, -inf outside the probed cells
            part, probed = xt[i : i + chunk], cells[i : i + chunk]
            dense = torch.full((len(part), len(self.fine)), -torch.inf)
            for c in np.unique(probed):
                r = torch.as_tensor(np.flatnonzero((probed == c).any(axis=1)))
                kids = torch.as_tensor(self.children[c])
                if len(kids):
                    dense[r[:, None], kids[None, :]] = part[r] @ f[kids].T
            s_top, j_top = torch.topk(dense, m, dim=1)
            idx[i : i + chunk], sim[i : i + chunk] = j_top.numpy(), s_top.numpy()
        return idx, sim
