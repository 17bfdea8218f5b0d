"""Hierarchical k-means for diversity sampling at 1M x 768, against pt-kmeans (the library
the reference walkthrough uses) at the same settings on the same data, in one run.

Both: levels 2,000 / 200 / 20, 10 iterations, cosine, k-means++ seeding, plain hierarchy
(``method="centers"``: each level clusters the centroids below), seed 0.
- biocurate: the pipeline's distributed path (``pipeline.stages.sample.fit_sample`` on local Ray
  Data: a hash(seed, id) sample of ``--sample`` rows fitted in one Ray task, Lloyd steps in
  bfloat16 products; then every row assigned in ``map_batches`` actors).
- pt-kmeans: ``hierarchical_kmeans`` on all rows in this process (float32, CPU), rows
  L2-normalized once and passed with ``x_pre_normalized=True`` (its fast path; the timing
  includes that normalization).
Inertia: mean cosine distance of all rows to their level-1 centroid, for both. Peak
memory: sum of PSS over this process and Ray's (see bench/dedup.py), during our run; it
includes the bench's own copy of the data.

    python bench/sample.py                  # 1M (pt-kmeans takes most of the time)
    python bench/sample.py --n 100000       # a quick look

Ends with one JSON line: {"speed_vs_pt_kmeans", "inertia_ratio_vs_pt_kmeans", "seconds_1m", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from dedup import PeakRSS, clustered  # noqa: E402


def ours(x16: np.ndarray, levels: list[int], iters: int, sample: int, seed: int) -> dict:
    import ray

    from manifests.config import load_config
    from pipeline.stages.sample import fit_sample
    from stages import sample as ssa

    n, dim = x16.shape
    ids = [f"{i:09d}" for i in range(n)]
    table = pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x16.ravel()), dim)})
    ds = ray.data.from_arrow([table.slice(i, 50_000) for i in range(0, n, 50_000)]).materialize()
    del table
    cfg = load_config(None, {"input.path": "/tmp", "output": "/tmp/bench-sample", "run.seed": seed,
                             "sample.target": 1, "sample.levels": levels, "sample.iters": iters,
                             "sample.method": "centers", "sample.sample_size": sample,
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}]})
    with PeakRSS() as mem:
        t0 = time.time()
        fitted, report = fit_sample(cfg, ds, n, "cpu")
        t_fit = time.time() - t0
        assigned = ds.map_batches(ssa.AssignLevels, batch_format="pyarrow", batch_size=8192, concurrency=2,
                                  num_cpus=1, fn_constructor_kwargs={"levels": fitted, "seed": seed, "taxon": None,
                                                                     "parts": 1})
        sims = [np.asarray(b["_sim"]) for b in assigned.select_columns(["_sim"]).iter_batches(
            batch_format="numpy", batch_size=None)]
        seconds = time.time() - t0
    sim = np.concatenate(sims).astype(np.float64)
    return {"seconds": round(seconds, 1), "fit_s": round(t_fit, 1), "assign_s": round(seconds - t_fit, 1),
            "inertia": float((1 - sim).mean()), "peak_rss_gb": round(mem.peak / 2**30, 2),
            "sample": report["sample"], "levels": report["levels"]}


def pt(x16: np.ndarray, levels: list[int], iters: int, seed: int) -> dict:
    from pt_kmeans import hierarchical_kmeans

    # Rows normalized once and x_pre_normalized=True: pt-kmeans' fast path. Left to itself
    # it re-normalizes all rows at every k-means++ step (2,000 times here): it had not left
    # its k-means++ initialization after 31 minutes.
    t0 = time.time()
    xn = torch.nn.functional.normalize(torch.from_numpy(x16.astype(np.float32)), dim=1)
    # chunk_size: its distances in row chunks (the full 1M x 2,000 matrix and its
    # temporaries took it past this machine's 24 GB: OOM-killed in its first Lloyd step).
    res = hierarchical_kmeans(xn, levels, max_iters=iters, distance_metric="cosine", init_method="kmeans++",
                              random_seed=seed, method="centers", x_pre_normalized=True, chunk_size=65536)
    seconds = time.time() - t0
    c = torch.nn.functional.normalize(res[0]["centers"].float(), dim=1)
    x = xn
    a = res[0]["assignment"].long()
    sim = torch.cat([(xn[i : i + 65536] * c[a[i : i + 65536]]).sum(1) for i in range(0, len(x), 65536)])
    return {"seconds": round(seconds, 1), "inertia": float((1 - sim.double()).mean())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--levels", type=int, nargs="+", default=[2000, 200, 20])
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--sample", type=int, default=200_000, help="rows our fit uses (sample.sample_size)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import ray

    torch.set_num_threads(2)
    x16 = clustered(args.n, args.dim, 1000, args.seed).astype(np.float16)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=6 * 2**30,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    a = ours(x16, args.levels, args.iters, args.sample, args.seed)
    print(json.dumps({"biocurate": a}), flush=True)
    ray.shutdown()
    b = pt(x16, args.levels, args.iters, args.seed)
    print(json.dumps({"pt_kmeans": b}), flush=True)
    line = {"speed_vs_pt_kmeans": round(b["seconds"] / a["seconds"], 2),
            "inertia_ratio_vs_pt_kmeans": round(a["inertia"] / b["inertia"], 4),
            "seconds_1m" if args.n == 1_000_000 else f"seconds_{args.n}": a["seconds"],
            "peak_rss_gb": a["peak_rss_gb"], "inertia": round(a["inertia"], 5),
            "pt_kmeans_inertia": round(b["inertia"], 5), "pt_kmeans_seconds": b["seconds"]}
    print(json.dumps(line))


if __name__ == "__main__":
    main()
