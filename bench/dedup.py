"""Semantic near-duplicate search at 100k and 1M x 768 float16 embeddings, through the
pipeline's distributed path (``pipeline.neardedup.semantic_pairs`` on local Ray Data):
two-level k-means partitions fitted on a sample, calibrated multi-assignment, a hash
shuffle of (partition, block pair) groups, bf16 screen + float32 check inside each group.

Data: clustered synthetic embeddings (1,000 clusters, Zipf sizes, in-cluster cosine about
0.5) with 1% of the rows overwritten by partners of other rows at cosines spread evenly over
[threshold, 1] in random directions. Recall is against exact search at the same
threshold: exhaustive at 100k, and at 1M for 2,000 query rows drawn at random against all
rows (the pairs found for those queries / the pairs exact search finds for them). Peak
memory (``peak_rss_gb``) is the largest sum of PSS -- resident memory with each shared page
split between the processes mapping it -- over this process and Ray's processes, sampled
every 0.2 s (``peak_rss_sum_gb``: the plain RSS sum, which counts Ray's shared object store
once per worker).

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


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((clusters, dim), dtype=np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    label = rng.zipf(1.5, n) % clusters
    x = np.empty((n, dim), np.float32)
    for i in range(0, n, 100_000):
        part = cent[label[i : i + 100_000]] + rng.standard_normal((len(label[i : i + 100_000]), dim),
                                                                    dtype=np.float32) / np.sqrt(dim)
        x[i : i + 100_000] = part / np.linalg.norm(part, axis=1, keepdims=True)
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


def _memory_of_run() -> tuple[int, int]:
    """(sum of PSS, sum of RSS) in bytes over this process and Ray's processes (from /proc).
    PSS splits a shared page (Ray's object store is mapped by every worker) between the
    processes mapping it, so its sum is the memory the run really holds; RSS counts a shared
    page once per process."""
    import os

    pss = rss = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
            if int(pid) != os.getpid() and b"ray" not in cmd:
                continue
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            continue
    return pss, rss


class PeakRSS:
    """Largest total PSS (and RSS) of this process and Ray's processes, sampled every 0.2 s."""

    def __init__(self):
        self.peak = self.peak_rss_sum = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            pss, rss = _memory_of_run()
            self.peak, self.peak_rss_sum = max(self.peak, pss), max(self.peak_rss_sum, rss)
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self.thread.join()


def run_one(n: int, dim: int, threshold: float, seed: int, cfg) -> dict:
    import ray

    from pipeline.neardedup import semantic_pairs
    from stages.kernels import neardup as kn

    x = clustered(n, dim, 1000, seed)
    plant(x, threshold, 0.01, seed)
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
           "peak_rss_sum_gb": round(mem.peak_rss_sum / 2**30, 2),
           "true_pairs": len(truth), "recall": round(recall, 4), "pairs_found": len(found), "report": report}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--threshold", type=float, default=0.75, help="cosine (SSCD's default here)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import ray

    from pipeline.config import load_config

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=10 * 2**30,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parent.parent)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    cfg = load_config(None, {"input.path": "/tmp", "output": "/tmp/bench-dedup",
                             "near_dedup.threshold": args.threshold, "near_dedup.center": False})
    results = {n: run_one(n, args.dim, args.threshold, args.seed, cfg) for n in args.sizes}
    small, big = results.get(100_000), results.get(1_000_000)
    line = {"recall_100k": small and small["recall"], "recall_1m": big and big["recall"],
            "time_ratio_1m_100k": round(big["seconds"] / small["seconds"], 2) if small and big else None,
            "seconds_1m": big and big["seconds"], "peak_rss_gb_1m": big and big["peak_rss_gb"]}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
