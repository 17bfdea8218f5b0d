"""A periodic refresh with 10% new images vs a full rerun of the same corpus, in one run.

Corpus: ``--n`` JPEGs of 0.3-1 MP, collages of tiles cut from real photographs with 5%
edited copies (:func:`collages`). v1 is the first 90%; v2 is all of them (10% new). Every
run is the whole pipeline (validate, the real MobileNetV2 on CPU, exact dedup, filters,
near-dedup, sampling to half the corpus), started as ``pipeline/run.py`` starts it (a
local Ray with 2 CPUs):

1. v1, full (the previous run; not timed);
2. v2, full: a new output and an empty embedding cache -- what a rerun without refresh costs;
3. v2, refresh: ``--previous`` the v1 run (its validation and embeddings reused, its kept
   images first in their near-duplicate groups, its centroids reused, diff/ written).

    python bench/refresh.py                 # 8,000 images: about 20 minutes on 2 cores
    python bench/refresh.py --n 1500        # a quick look (fixed costs weigh more)

What it shows: the refresh pays for what is new (decode and model calls for 10% of the
images) plus a fetch and sha256 of every image and the global steps on the narrow table;
a full rerun decodes and embeds everything. Both also pay fixed per-stage costs (Ray Data
executions, actor start-up): at 1,500 images the ratio is about 0.6. Measured at 8,000:
0.223 (docs/scaling.md, "A periodic refresh").

Ends with one JSON line: {"refresh_vs_full": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def collages(n: int, seed: int, copies: float = 0.05) -> list[bytes]:
    """``n`` JPEGs of 0.3-1 MP, each a collage of 4-9 tiles cut from the real photographs
    of ``pipeline.testdata.images`` (random photo, crop, flip, quarter turn and colour gain per
    tile, random grid): distinct pictures, as most of a real corpus is. A fraction
    ``copies`` are edited copies (re-encoded, resized, cropped) of an earlier image: the
    near-duplicates a real corpus also holds."""
    import io

    import numpy as np
    from PIL import Image

    from pipeline.testdata import images

    rng = np.random.default_rng(seed)
    photos = list(images.photos().values())
    out: list[bytes] = []
    for i in range(n):
        if i and rng.random() < copies:  # an edited copy of an earlier image
            img = Image.open(io.BytesIO(out[int(rng.integers(0, i))])).convert("RGB")
            w, h = img.size
            f = rng.uniform(0.85, 1.0)
            x0, y0 = int(rng.integers(0, w - int(w * f) + 1)), int(rng.integers(0, h - int(h * f) + 1))
            img = img.crop((x0, y0, x0 + int(w * f), y0 + int(h * f)))
            img = img.resize((int(img.width * rng.uniform(0.7, 1.0)), int(img.height * rng.uniform(0.7, 1.0))))
        else:
            px, aspect = rng.uniform(0.3e6, 1.0e6), rng.uniform(0.75, 1.5)
            w, h = int((px * aspect) ** 0.5), int((px / aspect) ** 0.5)
            rows, cols = int(rng.integers(2, 4)), int(rng.integers(2, 4))
            canvas = np.zeros((h, w, 3), np.uint8)
            ys, xs = np.linspace(0, h, rows + 1).astype(int), np.linspace(0, w, cols + 1).astype(int)
            for r in range(rows):
                for c in range(cols):
                    src = photos[int(rng.integers(0, len(photos)))]
                    sh, sw = src.shape[:2]
                    f = rng.uniform(0.25, 0.6)
                    ch, cw = int(sh * f), int(sw * f)
                    y0, x0 = int(rng.integers(0, sh - ch + 1)), int(rng.integers(0, sw - cw + 1))
                    tile = np.rot90(src[y0 : y0 + ch, x0 : x0 + cw], int(rng.integers(0, 4)))
                    if rng.random() < 0.5:
                        tile = tile[:, ::-1]
                    tile = np.clip(tile * rng.uniform(0.7, 1.3, 3), 0, 255).astype(np.uint8)
                    cell = Image.fromarray(np.ascontiguousarray(tile)).resize((xs[c + 1] - xs[c], ys[r + 1] - ys[r]))
                    canvas[ys[r] : ys[r + 1], xs[c] : xs[c + 1]] = np.asarray(cell)
            img = Image.fromarray(canvas)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(85, 93)))
        out.append(buf.getvalue())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=8000)
    ap.add_argument("--new", type=float, default=0.10, help="fraction of v2 that is new")
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import pyarrow as pa
    import pyarrow.csv as pacsv
    import ray

    from pipeline import plan
    from manifests.config import load_config

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-refresh-"))
    if work.exists():
        shutil.rmtree(work)
    (work / "img").mkdir(parents=True)
    blobs = collages(args.n, seed=0)
    uris = []
    for i, b in enumerate(blobs):
        p = work / "img" / f"{i:06d}.jpg"
        p.write_bytes(b)
        uris.append(str(p))
    n_old = int(round(args.n * (1 - args.new)))
    pacsv.write_csv(pa.table({"uri": uris[:n_old]}), work / "v1.csv")
    pacsv.write_csv(pa.table({"uri": uris}), work / "v2.csv")

    # Ray is started by the first plan.run, as `pipeline/run.py` starts it (local, 2 CPUs)
    def cfg(manifest: str, out: str, **more):
        return load_config(None, {"input.path": str(work / manifest), "output": str(work / out), "run.num_cpus": 2,
                                  "embed.models": [{"name": "mobilenet_v2_imagenet"}],
                                  "embed.cache_path": str(work / out / "cache"),
                                  "sample.fraction": 0.5, **more})

    timings = {}
    for name, c in (("v1", cfg("v1.csv", "v1")), ("full", cfg("v2.csv", "full")),
                    ("refresh", cfg("v2.csv", "refresh", **{"refresh.previous": str(work / "v1")}))):
        t0 = time.time()
        s = plan.run(c)
        timings[name] = {"seconds": round(time.time() - t0, 1), "stages": s["timings_s"],
                         "embed": {k: {"computed": v["computed"], "cached": v["cached"]} for k, v in s["embed"].items()},
                         "curated": s["curated"], "refresh": s.get("refresh")}
        print(json.dumps({name: timings[name]}), flush=True)
    ray.shutdown()
    line = {"refresh_vs_full": round(timings["refresh"]["seconds"] / timings["full"]["seconds"], 3),
            "full_s": timings["full"]["seconds"], "refresh_s": timings["refresh"]["seconds"],
            "images": args.n, "new": args.n - n_old,
            "computed_in_refresh": timings["refresh"]["embed"]["mobilenet_v2_imagenet"]["computed"]}
    print(json.dumps(line))
    shutil.rmtree(work, ignore_errors=True)
    return line


if __name__ == "__main__":
    main()
