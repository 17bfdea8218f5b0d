"""Near-duplicate detection kernels: pure numpy/torch, no Ray.

Two detectors, both exact in their final test, approximate only in which pairs they test:

* **perceptual** -- 64-bit pHash within a Hamming radius. Candidates share a band key:
  ``tables`` random subsets of ``bits`` hash bits (bit-sampling LSH for Hamming distance);
  a pair at distance h collides in one table with probability C(64-h, bits) / C(64, bits),
  so ``tables`` is chosen for the recall target at the radius.
* **semantic** -- cosine similarity of centred, L2-normalized embeddings of a copy-detection
  model above a threshold. Candidates share a partition: spherical k-means on a sample, each
  row assigned to its ``m`` nearest centroids (a pair split by a partition boundary is still
  found when one of the pair is also assigned across it); all pairs inside a partition are
  compared by matrix products. Partitions are packed into buckets (:func:`pack_cells`); one
  larger than ``max_block`` rows is cut into blocks that may lie in several buckets, and
  compared bucket pair by bucket pair, so no worker ever holds more than two buckets.

Pairs become groups with :func:`connected_components` (union-find by hooking and pointer
jumping, vectorized); :func:`keep_order` ranks a group's members for the keep policy.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from stages.kernels.phash import hamming64

# --------------------------------------------------------------------------- ids and groups


def id_keys(ids: list[str]) -> np.ndarray:
    """A uint64 key per id (blake2b): compact node names for the pair graph."""
    return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little") for i in ids],
                    dtype=np.uint64)


def sorted_lookup(nodes: np.ndarray, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each of ``keys``, its position in the sorted ``nodes`` and whether it is there."""
    pos = np.searchsorted(nodes, keys).clip(0, max(0, len(nodes) - 1))
    return pos, ((nodes[pos] == keys) if len(nodes) else np.zeros(len(keys), bool))


def _hook(parent: np.ndarray, ea: np.ndarray, eb: np.ndarray) -> np.ndarray:
    """Union the sets of ``parent`` (node -> root, roots point at themselves) joined by
    the edges ``ea[i] -- eb[i]`` (indices); every node then points at its set's smallest
    node. Roots are hooked smaller-under-larger and paths compressed by pointer jumping
    until no edge joins two roots."""
    while True:
        ra, rb = parent[ea], parent[eb]
        diff = ra != rb
        if not diff.any():
            return parent
        lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)
        while True:  # pointer jumping: every node points at its root
            up = parent[parent]
            if np.array_equal(up, parent):
                break
            parent = up


def connected_components(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Union-find over the edges ``a[i] -- b[i]`` (any integer node names).

    Returns ``(nodes, root)``: the sorted distinct nodes and, for each, the smallest node of
    its component (a stable group name)."""
    nodes, inv = np.unique(np.concatenate([np.asarray(a), np.asarray(b)]), return_inverse=True)
    if len(nodes) == 0:
        return nodes, nodes
    parent = _hook(np.arange(len(nodes)), inv[: len(a)], inv[len(a):])
    return nodes, nodes[parent]


def spanning_pairs(a: np.ndarray, b: np.ndarray, score: np.ndarray, keep_max: bool = False):
    """The edges of a best-score spanning forest of the pair graph (Boruvka, vectorized):
    the same connected components with at most nodes - 1 edges, and every node's best
    edge among them (its smallest score, or largest with ``keep_max``). Hundreds of copies
    of one picture are hundreds of thousands of pairs; their forest is hundreds of edges.
    Ties are broken by the pair (min, max) so the result does not depend on input order."""
    a, b, score = np.asarray(a), np.asarray(b), np.asarray(score)
    if len(a) == 0:
        return a, b, score
    nodes, inv = np.unique(np.concatenate([a, b]), return_inverse=True)
    ea, eb = inv[: len(a)], inv[len(a):]
    lo, hi = np.minimum(ea, eb), np.maximum(ea, eb)
    order = np.lexsort((hi, lo, -score if keep_max else score))
    rank = np.empty(len(a), np.int64)
    rank[order] = np.arange(len(a))
    parent = np.arange(len(nodes))
    chosen = np.zeros(len(a), bool)
    none = np.int64(len(a))
    while True:
        ca, cb = parent[ea], parent[eb]
        live = np.flatnonzero(ca != cb)
        if len(live) == 0:
            break
        best = np.full(len(nodes), none)
        np.minimum.at(best, ca[live], rank[live])
        np.minimum.at(best, cb[live], rank[live])
        picked = order[np.unique(best[best < none])]
        chosen[picked] = True
        parent = _hook(parent, ea[picked], eb[picked])
    keep = np.flatnonzero(chosen)
    return a[keep], b[keep], score[keep]


def band_collision(h: int, bits: int) -> float:
    """Probability that two 64-bit hashes at Hamming distance h agree on ``bits`` random
    distinct positions."""
    if bits > 64 - h:
        return 0.0
    return math.comb(64 - h, bits) / math.comb(64, bits)


def tables_for(p_one: float, recall: float, cap: int = 512) -> int:
    """Tables needed so that 1 - (1 - p_one)^tables >= recall."""
    if p_one >= 1.0:
        return 1
    if p_one <= 0.0:
        return cap
    return int(min(cap, max(1, math.ceil(math.log(1 - recall) / math.log(1 - p_one)))))


def perceptual_params(max_hamming: int, recall: float, bits: int) -> dict:
    p = band_collision(max_hamming, bits)
    tables = tables_for(p, recall)
    return {"max_hamming": max_hamming, "bits": bits, "tables": tables, "p_one_table": p,
            "recall_at_radius": 1 - (1 - p) ** tables}


def band_positions(tables: int, bits: int, seed: int) -> np.ndarray:
    """(tables, bits) distinct bit positions per table, a function of the seed."""
    rng = np.random.default_rng(seed)
    return np.stack([np.sort(rng.choice(64, bits, replace=False)) for _ in range(tables)]).astype(np.uint64)


def band_keys(phash: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """(n, tables) uint64 bucket keys: the table number in the high bits, the sampled bits below."""
    h = np.asarray(phash, dtype=np.uint64)[:, None, None]
    bits = (h >> positions[None]) & np.uint64(1)  # (n, tables, bits)
    weights = np.uint64(1) << np.arange(positions.shape[1], dtype=np.uint64)
    packed = (bits * weights).sum(axis=2, dtype=np.uint64)
    return packed | (np.arange(positions.shape[0], dtype=np.uint64) << np.uint64(40))[None, :]


def hamming_pairs(bucket: np.ndarray, phash: np.ndarray, node: np.ndarray, max_hamming: int,
                  max_block: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(node_a, node_b, hamming)`` with distance <= ``max_hamming`` among rows that
    share a bucket. Rows with the same hash in a bucket are chained to its first row (a
    star, not all pairs: thousands of copies of one picture stay linear); distinct hashes
    in a bucket are compared all against all, ``max_block`` at a time."""
    order = np.lexsort((node, phash, bucket))
    bucket, phash, node = bucket[order], phash[order], node[order]
    out_a, out_b, out_h = [], [], []
    # identical (bucket, hash): star edges to the run's first row
    same = np.flatnonzero((bucket[1:] == bucket[:-1]) & (phash[1:] == phash[:-1])) + 1
    if len(same):
        starts = np.flatnonzero(np.r_[True, (bucket[1:] != bucket[:-1]) | (phash[1:] != phash[:-1])])
        first = starts[np.searchsorted(starts, same, side="right") - 1]
        out_a.append(node[first])
        out_b.append(node[same])
        out_h.append(np.zeros(len(same), np.int64))
    # distinct hashes sharing a bucket
    uniq = np.r_[True, (bucket[1:] != bucket[:-1]) | (phash[1:] != phash[:-1])]
    ub, uh, un = bucket[uniq], phash[uniq], node[uniq]
    edges = np.flatnonzero(np.r_[True, ub[1:] != ub[:-1], True])
    sizes = np.diff(edges)
    pair2 = edges[:-1][sizes == 2]  # the common case, vectorized
    if len(pair2):
        d = hamming64(uh[pair2], uh[pair2 + 1])
        ok = d <= max_hamming
        out_a.append(un[pair2][ok])
        out_b.append(un[pair2 + 1][ok])
        out_h.append(d[ok].astype(np.int64))
    for s, size in zip(edges[:-1][sizes > 2], sizes[sizes > 2]):
        hs, ns = uh[s : s + size], un[s : s + size]
        for i in range(0, size, max_block):
            for j in range(i, size, max_block):
                d = hamming64(np.repeat(hs[i : i + max_block], len(hs[j : j + max_block])),
                              np.tile(hs[j : j + max_block], len(hs[i : i + max_block])))
                d = d.reshape(len(hs[i : i + max_block]), -1)
                ii, jj = np.nonzero(d <= max_hamming)
                keep = (i + ii) < (j + jj)
                out_a.append(ns[i + ii[keep]])
                out_b.append(ns[j + jj[keep]])
                out_h.append(d[ii[keep], jj[keep]].astype(np.int64))
    if not out_a:
        e = np.zeros(0, np.uint64)
        return e, e, np.zeros(0, np.int64)
    return unique_pairs(np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_h))


def unique_pairs(a: np.ndarray, b: np.ndarray, score: np.ndarray, keep_max: bool = False):
    """Pairs ordered (min, max), self-pairs dropped, one row per pair (the smallest score,
    or the largest with ``keep_max``)."""
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    ok = lo != hi
    lo, hi, score = lo[ok], hi[ok], score[ok]
    if len(lo) == 0:
        return lo, hi, score
    order = np.lexsort((-score if keep_max else score, hi, lo))
    lo, hi, score = lo[order], hi[order], score[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    return lo[first], hi[first], score[first]


# --------------------------------------------------------------------------- semantic

def center_normalize(x: np.ndarray, mean: np.ndarray | None) -> np.ndarray:
    """Subtract the corpus mean (when given), then L2-normalize; float32."""
    x = np.asarray(x, dtype=np.float32)
    if mean is not None:
        x = x - np.asarray(mean, dtype=np.float32)[None, :]
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def collision_hyperplanes(cos: float, planes: int, tables: int) -> float:
    """Probability that random-hyperplane LSH with ``tables`` x ``planes`` puts a pair at
    cosine ``cos`` in a common bucket (for comparison with the reference's 4 x 18)."""
    p = 1.0 - math.acos(max(-1.0, min(1.0, cos))) / math.pi
    return 1.0 - (1.0 - p ** planes) ** tables


def n_blocks(size: int, max_block: int) -> int:
    return max(1, -(-size // max_block))


def block_of(keys: np.ndarray, blocks: np.ndarray) -> np.ndarray:
    """Block of each row inside its partition: its key modulo the partition's block count."""
    return (np.asarray(keys, dtype=np.uint64) % np.asarray(blocks, dtype=np.uint64)).astype(np.int64)


def pack_cells(sizes: np.ndarray, max_block: int, bucket_rows: int) -> dict:
    """Where each partition's rows are stored for comparison.

    A partition of ``sizes[p]`` rows is cut into ``blocks[p]`` cells of at most about
    ``max_block`` rows (by :func:`block_of`); cells, in partition order, fill buckets of
    about ``bucket_rows`` rows (a bucket holds at most ``bucket_rows + max_block``). The
    comparisons are *tasks* (u, v): u == v, all pairs inside each partition among the rows
    of bucket u; u < v, the pairs of each partition between its rows in u and in v (only
    for partitions spread over both). Every pair of rows of a partition is in exactly one
    task, and a task holds at most two buckets.

    Returns ``blocks`` (per partition), ``cell_start`` (index of a partition's first cell),
    ``bucket`` (per cell) and ``tasks`` (sorted (u, v) pairs)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    blocks = np.maximum(1, -(-sizes // max_block))
    cell_start = np.concatenate([[0], np.cumsum(blocks)[:-1]]).astype(np.int64)
    cell_size = np.repeat(-(-sizes // blocks), blocks)
    before = np.concatenate([[0], np.cumsum(cell_size)[:-1]])
    bucket = (before // max(1, bucket_rows)).astype(np.int64)
    tasks = {(int(u), int(u)) for u in np.unique(bucket)}
    for p in np.flatnonzero(blocks > 1):
        held = np.unique(bucket[cell_start[p] : cell_start[p] + blocks[p]])
        tasks.update((int(u), int(v)) for i, u in enumerate(held) for v in held[i + 1 :])
    return {"blocks": blocks, "cell_start": cell_start, "bucket": bucket, "tasks": sorted(tasks)}


def bucket_of(parts: np.ndarray, keys: np.ndarray, packing: dict) -> np.ndarray:
    """Bucket of each (row, partition) copy: ``parts`` (n, m) partition ids, ``keys`` (n,)."""
    p = np.asarray(parts, dtype=np.int64)
    k = np.repeat(np.asarray(keys, dtype=np.uint64), p.shape[1]).reshape(p.shape)
    return packing["bucket"][packing["cell_start"][p] + block_of(k, packing["blocks"][p])]


def bucket_pairs(u: tuple, v: tuple | None, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs at cosine >= ``threshold`` of one task. ``u``, ``v``: a bucket's copies as
    (partition, key, x); ``v`` None: all pairs inside each partition of ``u``; else the
    pairs of each partition between its rows in ``u`` and in ``v``."""
    pu, ku, xu = u
    out = []
    if v is None:
        order = np.argsort(pu, kind="stable")
        bounds = np.flatnonzero(np.r_[True, pu[order][1:] != pu[order][:-1], True]) if len(pu) else [0]
        for s, e in zip(bounds[:-1], bounds[1:]):
            r = order[s:e]
            if len(r) > 1:
                out.append(cosine_pairs(xu[r], ku[r], None, None, threshold))
    else:
        pv, kv, xv = v
        for p in np.intersect1d(pu, pv):
            a, b = pu == p, pv == p
            out.append(cosine_pairs(xu[a], ku[a], xv[b], kv[b], threshold))
    return merge_pairs(out)


SCREEN_MARGIN = 0.02  # bf16 products are within ~0.004 of fp32 for unit vectors: 5x that


def cosine_pairs(xa: np.ndarray, ka: np.ndarray, xb: np.ndarray | None, kb: np.ndarray | None,
                 threshold: float, chunk: int | None = None, screen: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(key_a, key_b, cosine)`` with cosine >= ``threshold`` between the rows of
    ``xa`` and ``xb`` (normalized), or among the rows of ``xa`` when ``xb`` is None.

    With ``screen``, products are computed in bfloat16 (several times faster on CPUs with
    bf16 units, and on GPUs) and every pair above ``threshold - SCREEN_MARGIN`` is then
    verified in float32: the result is the float32 one."""
    same = xb is None
    ta = torch.as_tensor(np.asarray(xa, dtype=np.float32))
    tb = ta if same else torch.as_tensor(np.asarray(xb, dtype=np.float32))
    kb = ka if same else kb
    fast_a = ta.to(torch.bfloat16) if screen else ta
    fast_b = fast_a if same else (tb.to(torch.bfloat16) if screen else tb)
    cut = threshold - SCREEN_MARGIN if screen else threshold
    chunk = chunk or max(64, min(4096, 2**24 // max(1, len(tb))))  # a product block <= 64 MB
    out_a, out_b, out_s = [], [], []
    for i in range(0, len(ta), chunk):
        lo = i if same else 0  # among one set: the upper triangle only
        s = (fast_a[i : i + chunk] @ fast_b[lo:].T).float()
        if same:
            s[torch.arange(len(s))[:, None] >= torch.arange(s.shape[1])[None, :]] = -2.0
        ii, jj = torch.nonzero(s >= cut, as_tuple=True)
        if len(ii):
            exact = (ta[i + ii] * tb[lo + jj]).sum(dim=1) if screen else s[ii, jj]
            ok = exact >= threshold
            ii, jj, exact = ii[ok], jj[ok], exact[ok]
            out_a.append(ka[i + ii.numpy()])
            out_b.append(kb[lo + jj.numpy()])
            out_s.append(exact.numpy())
    if not out_a:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32)
    return np.concatenate(out_a), np.concatenate(out_b), np.concatenate(out_s)


def semantic_pairs_local(x: np.ndarray, keys: np.ndarray, partition, m: int, threshold: float,
                         max_block: int, bucket_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distributed semantic path in one process (same assignment, packing and tasks):
    for tests and benchmarks against exhaustive search."""
    idx, _ = partition.assign(x, m)
    packing = pack_cells(np.bincount(idx.ravel(), minlength=partition.k), max_block, bucket_rows)
    bucket = bucket_of(idx, keys, packing).ravel()
    row = np.repeat(np.arange(len(x)), idx.shape[1])
    part = idx.ravel()

    def copies(b):
        sel = bucket == b
        return part[sel], keys[row[sel]], x[row[sel]]

    return merge_pairs([bucket_pairs(copies(u), None if u == v else copies(v), threshold)
                        for u, v in packing["tasks"]])


def merge_pairs(parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]):
    parts = [p for p in parts if len(p[0])]
    if not parts:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32)
    a, b, s = (np.concatenate(c) for c in zip(*parts))
    return unique_pairs(a, b, s, keep_max=True)


def calibrate_assign(x: np.ndarray, partition, threshold: float, recall: float, max_assign: int,
                     seed: int = 0, n_pairs: int = 4000, neighbours: int = 10) -> tuple[int, dict]:
    """How many partitions each row must join so that a pair *at* the threshold shares one
    with probability >= ``recall``. Partners of rows of ``x`` are planted at exactly the
    threshold (the worst case of the accepted pairs) in two kinds of directions: random
    ones (an edit moving the embedding anywhere), and towards one of the row's
    ``neighbours`` nearest rows of ``x`` (a pair along the data's own spread, which k-means
    boundaries cut across: natural near-duplicates, burst shots). For m = 1..max_assign the
    fraction of pairs whose top-m partition sets intersect is measured, the lower of the two
    kinds counting. Returns the smallest m reaching ``recall`` (else ``max_assign``) and the
    curve."""
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x), min(n_pairs, len(x)), replace=False)
    a = center_normalize(x[pick], None)
    u = rng.standard_normal(a.shape).astype(np.float32)
    if len(x) > 1:  # towards a near row: the neighbours among all of x, by bf16 products
        xb = torch.as_tensor(center_normalize(x, None)).to(torch.bfloat16)
        near = torch.topk((torch.as_tensor(a).to(torch.bfloat16) @ xb.T).float(),
                          min(neighbours + 1, len(x)), dim=1).indices.numpy()[:, 1:]
        other = near[np.arange(len(a)), rng.integers(0, near.shape[1], len(a))]
        u = np.concatenate([u, center_normalize(x[other], None)])
        a = np.concatenate([a, a])
    u -= (u * a).sum(axis=1, keepdims=True) * a
    u /= np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    t = max(-1.0, min(1.0, threshold))
    b = t * a + math.sqrt(1 - t * t) * u
    ia, _ = partition.assign(a, max_assign)
    ib, _ = partition.assign(b, max_assign)
    half = len(pick)
    curve = {}
    chosen = ia.shape[1]
    for m in range(1, ia.shape[1] + 1):
        hit = (ia[:, :m, None] == ib[:, None, :m]).any(axis=(1, 2))
        curve[m] = float(min(hit[:half].mean(), hit[half:].mean() if len(hit) > half else 1.0))
        if curve[m] >= recall:
            chosen = m
            break
    return chosen, curve


# --------------------------------------------------------------------------- keep policy

def keep_order(permissive: np.ndarray, quality: np.ndarray, pixels: np.ndarray, rank: np.ndarray,
               prior: np.ndarray | None = None) -> np.ndarray:
    """Indices of a group's members, best first: kept by a previous run first (``prior``,
    a refresh: the kept set stays stable), then a permissive licence (when known), then
    the highest quality score, then the largest resolution, then hash(seed, id)."""
    q = np.nan_to_num(np.asarray(quality, dtype=np.float64), nan=-np.inf)
    prior = np.zeros(len(q), dtype=bool) if prior is None else np.asarray(prior, dtype=bool)
    return np.lexsort((np.asarray(rank, dtype=np.uint64), -np.asarray(pixels, dtype=np.float64), -q,
                       ~np.asarray(permissive, dtype=bool), ~prior))


# --------------------------------------------------------------------------- direct keep

NOT_DECIDED = -2  # a row left kept because its component passed max_kept kept rows


def direct_keep(order: np.ndarray, refs: np.ndarray, phash: np.ndarray, has_phash: np.ndarray,
                x: np.ndarray | None, has_x: np.ndarray, threshold: float | None, max_hamming: int | None,
                x_flip: np.ndarray | None = None, max_kept: int = 20_000) -> dict:
    """Greedy, exact keep inside one group of rows (one connected component of the pair
    graph): walk ``order`` (row indices, best first) and remove a row only when it
    *directly* matches a row already kept -- pHash within ``max_hamming``, or cosine of
    the normalized rows of ``x`` at least ``threshold`` (with ``x_flip``, each row's
    mirror image embedded too: the larger of cos(a, b) and cos(flip a, b)) -- naming the
    best such row; otherwise it is kept, whatever the rest of its group matches. A~B and
    B~C say nothing of A and C: a chain A~B~C with A and C apart keeps both A and C.

    ``refs``: rows kept from the start and never decided (reference images); a row that
    matches one names it first. Cost: one product per row against the kept rows so far;
    once ``max_kept`` rows are kept, the rest of ``order`` is kept undecided
    (``match == NOT_DECIDED``): a component of that many distinct images is not a
    duplicate cluster, and keeping is the safe side.

    Returns ``match`` (row matched, -1 kept), ``similarity`` (that pair's cosine, else
    1 - h/64), ``hamming`` (-1: not matched by pHash), ``cosine`` (nan: no embedding pair)."""
    n = len(phash)
    order = np.asarray(order, dtype=np.int64)
    refs = np.asarray(refs, dtype=np.int64)
    match = np.full(n, -1, np.int64)
    sim = np.full(n, np.nan, np.float32)
    ham = np.full(n, -1, np.int16)
    cos = np.full(n, np.nan, np.float32)
    use_x = x is not None and threshold is not None
    use_h = max_hamming is not None
    ph = np.asarray(phash, dtype=np.uint64)
    kept = np.empty(len(refs) + len(order), np.int64)
    nk = 0
    is_ref = np.zeros(n, bool)
    is_ref[refs] = True
    kx = np.zeros((len(kept), x.shape[1]), np.float32) if use_x else None
    kxf = np.zeros_like(kx) if use_x and x_flip is not None else None

    def keep(r):
        nonlocal nk
        kept[nk] = r
        if use_x:
            kx[nk] = x[r] if has_x[r] else 0.0
            if kxf is not None:
                kxf[nk] = x_flip[r] if has_x[r] else 0.0
        nk += 1

    for r in refs:
        keep(r)
    for pos, v in enumerate(order):
        if nk - len(refs) >= max_kept:
            match[order[pos:]] = NOT_DECIDED
            break
        ks = kept[:nk]
        s = h = None
        if use_x and has_x[v] and nk:
            s = kx[:nk] @ x[v]
            if kxf is not None:  # as the search: the largest of plain/mirrored on either side
                s = np.maximum.reduce([s, kx[:nk] @ x_flip[v], kxf[:nk] @ x[v], kxf[:nk] @ x_flip[v]])
            s = np.where(has_x[ks], s, -np.inf)
        if use_h and has_phash[v] and nk:
            h = hamming64(ph[ks], np.full(nk, ph[v], np.uint64))
            h = np.where(has_phash[ks], h, 65)
        hit_s = s >= threshold if s is not None else np.zeros(nk, bool)
        hit_h = h <= max_hamming if h is not None else np.zeros(nk, bool)
        hit = hit_s | hit_h
        if not hit.any():
            keep(v)
            continue
        strength = np.maximum(np.where(hit_s, s if s is not None else 0, -np.inf),
                              np.where(hit_h, 1 - (h if h is not None else 0) / 64, -np.inf))
        strength = np.where(hit, strength + 4 * is_ref[ks], -np.inf)  # a reference first
        best = int(np.argmax(strength))  # ties: the earlier kept (better) row
        match[v] = ks[best]
        ham[v] = int(h[best]) if hit_h[best] else -1
        cos[v] = float(s[best]) if s is not None and np.isfinite(s[best]) else np.nan
        sim[v] = float(s[best]) if hit_s[best] else 1 - float(h[best]) / 64
    return {"match": match, "similarity": sim, "hamming": ham, "cosine": cos}


def top_pairs(a: np.ndarray, b: np.ndarray, score: np.ndarray, per_node: int) -> tuple:
    """The pairs that are among the ``per_node`` highest-scoring pairs of either of their
    nodes (ties by the pair): a bounded sample, at most ``per_node`` x nodes pairs."""
    a, b, score = (np.asarray(v) for v in unique_pairs(np.asarray(a), np.asarray(b), np.asarray(score),
                                                      keep_max=True))
    if len(a) == 0 or per_node <= 0:
        return a[:0], b[:0], score[:0]
    node = np.concatenate([a, b])
    other = np.concatenate([b, a])
    s2 = np.concatenate([score, score])
    edge = np.concatenate([np.arange(len(a)), np.arange(len(a))])
    order = np.lexsort((other, -s2, node))
    node_sorted = node[order]
    start = np.flatnonzero(np.r_[True, node_sorted[1:] != node_sorted[:-1]])
    rank = np.arange(len(order)) - np.repeat(start, np.diff(np.r_[start, len(order)]))
    keep = np.zeros(len(a), bool)
    keep[edge[order[rank < per_node]]] = True
    return a[keep], b[keep], score[keep]
