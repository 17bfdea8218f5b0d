"""Semantic near-duplicate search at 100k and 1M x 768 float16 embeddings, through the
pipeline's distributed path (``pipeline.stages.near_dedup.semantic_pairs`` on local Ray Data):
two-level k-means partitions fitted on a sample, calibrated multi-assignment, the copies
written once grouped by bucket, bf16 screen + float32 check inside each comparison task.

Data: clustered synthetic embeddings (2,000 clusters, Zipf sizes, low-rank in-cluster
variation, in-cluster cosine about 0.5; ``--isotropic``: full-rank, the worst case) with 5%
of the rows overwritten by partners of other rows at cosines spread evenly over
[threshold, 1] in random directions. Recall is against exact search at the same
threshold: exhaustive at 100k, and at 1M for 2,000 query rows drawn at random against all
rows (the pairs found for those queries / the pairs exact search finds for them). Peak
memory (``peak_rss_gb``) is the most memory in use on the machine during the search
(MemTotal - MemAvailable, sampled every 0.2 s: Ray's processes and object store, and this
process with its own copy of the data); ``added_gb`` is that less what was in use before.

    python bench/dedup.py                 # 100k and 1M (about 15 min on 2 cores)
    python bench/dedup.py --sizes 20000   # a quick look

Ends with one JSON line: {"recall_100k", "recall_1m", "time_ratio_1m_100k", "seconds_1m",
"peak_rss_gb_1m"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402


def clustered(n: int, dim: int, clusters: int, seed: int, rank: int = 64, isotropic: bool = False) -> np.ndarray:
    """Unit vectors in ``clusters`` clusters with Zipf sizes (exponent 1.1: the largest
    holds about 10% of the rows). A row is its cluster's centre plus a variation in a
    ``rank``-dimensional subspace of the cluster (image embeddings have a low intrinsic
    dimension) and a little isotropic noise; in-cluster cosine about 0.4. ``isotropic``:
    full-rank noise instead (the worst case for any partitioning)."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((clusters, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    basis = rng.standard_normal((clusters, rank, dim), dtype=np.float32) / np.sqrt(dim)
    label = (rng.zipf(1.1, n) - 1) % clusters
    x = cent[label]
    if isotropic:
        for i in range(0, n, 50_000):
            x[i : i + 50_000] += rng.standard_normal((len(x[i : i + 50_000]), dim), dtype=np.float32) / np.sqrt(dim)
    else:
        order = np.argsort(label, kind="stable")
        bounds = np.searchsorted(label[order], np.arange(clusters + 1))
        for c in range(clusters):  # one cluster at a time: its rows' variation in its subspace
            rows = order[bounds[c] : bounds[c + 1]]
            z = rng.standard_normal((len(rows), rank), dtype=np.float32) * np.float32(np.sqrt(1.5 / rank))
            x[rows] += z @ basis[c]
        for i in range(0, n, 50_000):
            x[i : i + 50_000] += 0.15 * rng.standard_normal((len(x[i : i + 50_000]), dim), dtype=np.float32) / np.sqrt(dim)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def plant(x: np.ndarray, threshold: float, fraction: float, seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    n, d = x.shape
    count = int(n * fraction)
    perm = rng.permutation(n)
    src, dst = perm[:count], perm[count : 2 * count]
    s = rng.uniform(threshold, 1.0, count).astype(np.float32)
    u = rng.standard_normal((count, d), dtype=np.float32)
    u -= (u * x[src]).sum(1, keepdims=True) * x[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[dst] = s[:, None] * x[src] + np.sqrt(1 - s**2)[:, None] * u


def _memory_in_use() -> int:
    """Bytes of memory in use on the machine (MemTotal - MemAvailable): the run's processes,
    Ray's object store (shared memory) and the bench's own data; reclaimable page cache is
    not counted. Reading /proc/meminfo costs nothing, unlike summing every process's PSS
    (walking the page tables of workers that map the object store takes a core)."""
    info = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
    return info["MemTotal"] - info["MemAvailable"]


class PeakRSS:
    """Peak memory in use on the machine while the block runs (sampled every 0.2 s), and
    the same less what was in use when it started (``added``)."""

    def __init__(self):
        self.peak = self.start = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def added(self) -> int:
        return max(0, self.peak - self.start)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, _memory_in_use())
            time.sleep(0.2)

    def __enter__(self):
        self.start = self.peak = _memory_in_use()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def run_one(n: int, dim: int, threshold: float, seed: int, cfg, isotropic: bool = False,
            fraction: float = 0.05) -> dict:
    import ray

    from pipeline.stages.near_dedup import semantic_pairs
    from stages.kernels import near_dedup as kn

    x = clustered(n, dim, 2000, seed, isotropic=isotropic)
    plant(x, threshold, fraction, seed)
    x16 = x.astype(np.float16)
    x = x16.astype(np.float32)  # what the pipeline sees
    ids = [f"{seed}-{i:09d}" for i in range(n)]
    keys = kn.id_keys(ids)
    table = pa.table({"id": ids, "_key": pa.array(keys, pa.uint64()),
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x16.ravel()), dim)})
    ds = ray.data.from_arrow([table.slice(i, 50_000) for i in range(0, n, 50_000)]).materialize()
    del table
    with PeakRSS() as mem:
        t0 = time.time()
        (a, b, s), report = semantic_pairs(cfg, ds, n, "bench", threshold)
        seconds = time.time() - t0
    found = set(zip(a.tolist(), b.tolist()))
    rng = np.random.default_rng(seed + 2)
    if n <= 200_000:  # exhaustive
        ta, tb, _ = kn.cosine_pairs(x, keys, None, None, threshold)
        truth = set(zip(np.minimum(ta, tb).tolist(), np.maximum(ta, tb).tolist()))
        hit = len(truth & found)
    else:  # 2,000 query rows against everything
        q = np.sort(rng.choice(n, 2000, replace=False))
        qa, qb, _ = kn.cosine_pairs(x[q], keys[q], x, keys, threshold)
        ok = qa != qb
        truth = set(zip(np.minimum(qa[ok], qb[ok]).tolist(), np.maximum(qa[ok], qb[ok]).tolist()))
        hit = len(truth & found)
    recall = hit / len(truth) if truth else 1.0
    out = {"n": n, "seconds": round(seconds, 1), "peak_rss_gb": round(mem.peak / 2**30, 2),
           "added_gb": round(mem.added / 2**30, 2),
           "true_pairs": len(truth), "recall": round(recall, 4), "pairs_found": len(found), "report": report}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threshold", type=float, default=0.75, help="cosine (SSCD's default here)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--isotropic", action="store_true", help="full-rank in-cluster noise (worst case)")
    ap.add_argument("--planted", type=float, default=0.05, help="fraction of rows overwritten by a partner")
    args = ap.parse_args()
    import ray

    from manifests.config import load_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=10 * 2**30,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(None, {"input.path": "/tmp", "output": "/tmp/bench-dedup",
                             "near_dedup.threshold": args.threshold, "near_dedup.center": False})
    results = {n: run_one(n, args.dim, args.threshold, args.seed, cfg, args.isotropic, args.planted)
               for n in args.sizes}
    small, big = results.get(100_000), results.get(1_000_000)
    line = {"recall_100k": small and small["recall"], "recall_1m": big and big["recall"],
            "time_ratio_1m_100k": round(big["seconds"] / small["seconds"], 2) if small and big else None,
            "seconds_1m": big and big["seconds"], "peak_rss_gb_1m": big and big["peak_rss_gb"]}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
