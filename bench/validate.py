"""Benchmark: decode+validate throughput of the validate stage vs a naive Pillow loop.

Usage (from the repo root)::

    python bench/validate.py [--n 240] [--repeat 1] [--seed 0] [--grain 2.0]

Builds ``--n`` JPEG photos of 1-4 MP in memory, no network: real photos shipped with
scikit-image and scikit-learn, cropped (random offsets), flipped, brightness-jittered,
given a little sensor-like grain, upscaled with LANCZOS to camera-like sizes (multiples of
16, aspect ratios 1:1 to 16:9, both orientations) and encoded at quality 85-92.

Two loops over the same bytes, in the same process, one thread, no Ray:

* naive: ``Image.open`` -> ``.load()`` (full-resolution decode) -> ``.convert("RGB")``
  -> ``Image.resize`` (bilinear, antialiased) to short side 256, the size validate gives;
* validate: ``stages.validate.validate_image(data, ValidateConfig())``, which does
  *more* work than the naive loop (sha256, header checks, EXIF orientation, perceptual
  hash, decode deadline) but decodes JPEGs at reduced scale (libjpeg-turbo DCT scaling via
  simplejpeg, Pillow draft mode as fallback) and resizes with OpenCV's area averaging.

Every image must pass validation, and both loops must give the same output size for every
image. The fast path must still catch truncated files: ``--n-truncated`` JPEGs cut to 60%
of their bytes must all be rejected as ``corrupt``.

The process is pinned to one CPU where the OS allows it and BLAS/OpenMP pools are limited
to one thread, so images/s of this single-threaded process *is* images/s per core. Rounds
alternate naive, validate, naive, validate, ... (``--repeat`` rounds) to spread drift and
noise over both. The last line printed is one JSON object.
"""

from __future__ import annotations

import os

# One thread everywhere, before numpy (phash's matmul) can start a BLAS pool.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import PIL  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402

from manifests.schema import Reason  # noqa: E402
from manifests.config import ValidateConfig  # noqa: E402
from stages.validate import short_side_size, validate_image  # noqa: E402

SHORT_SIDE = 256
MIN_PX, MAX_PX = 1_000_000, 4_000_000
# (w, h) aspect ratios, landscape and portrait.
ASPECTS = [(4, 3), (3, 2), (16, 9), (1, 1), (5, 4), (3, 4), (2, 3), (9, 16)]


# ---------------------------------------------------------------------------- corpus


def _source_photos() -> list[tuple[str, np.ndarray]]:
    """Real photographs bundled with installed packages, as HxWx3 uint8."""
    import skimage.data as skd
    from sklearn.datasets import load_sample_images

    out: list[tuple[str, np.ndarray]] = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "immunohistochemistry", "hubble_deep_field"):
        try:
            a = np.asarray(getattr(skd, name)())
        except Exception as e:  # an optional data file that is not installed
            print(f"  (skipping skimage.data.{name}: {type(e).__name__})", file=sys.stderr)
            continue
        if a.ndim == 2:
            a = np.stack([a] * 3, axis=-1)
        out.append((name, np.ascontiguousarray(a[..., :3].astype(np.uint8))))
    for fname, a in zip(("china", "flower"), load_sample_images().images):
        out.append((fname, np.ascontiguousarray(a.astype(np.uint8))))
    if not out:
        raise SystemExit("no source photos available (need scikit-image or scikit-learn)")
    return out


def _target_size(rng: np.random.Generator) -> tuple[int, int]:
    """A camera-like size: multiples of 16, 1-4 MP, one of ASPECTS."""
    while True:
        aw, ah = ASPECTS[rng.integers(len(ASPECTS))]
        px = rng.uniform(MIN_PX * 1.02, MAX_PX * 0.98)
        unit = math.sqrt(px / (aw * ah))
        w = int(round(unit * aw / 16)) * 16
        h = int(round(unit * ah / 16)) * 16
        if MIN_PX <= w * h <= MAX_PX:
            return w, h


def make_corpus(n: int, rng: np.random.Generator, grain: float) -> list[bytes]:
    sources = _source_photos()
    sizes = [_target_size(rng) for _ in range(n)]
    noise = None
    if grain > 0:
        # One seeded Gaussian field, cropped at a random offset per image (drawing fresh
        # noise for each 4 MP image would dominate the corpus build time).
        side = max(max(s) for s in sizes) + 64
        noise = np.rint(rng.standard_normal((side, side, 3), dtype=np.float32) * grain).astype(np.int16)
    blobs: list[bytes] = []
    for i in range(n):
        name, src = sources[i % len(sources)]
        sh, sw = src.shape[:2]
        w, h = sizes[i]
        # Largest crop of the source with the target aspect, then 75-100% of it at a random offset.
        cw, ch = (sw, sw * h / w) if sw * h / w <= sh else (sh * w / h, sh)
        f = rng.uniform(0.75, 1.0)
        cw, ch = max(16, int(cw * f)), max(16, int(ch * f))
        x0 = int(rng.integers(0, sw - cw + 1))
        y0 = int(rng.integers(0, sh - ch + 1))
        img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).resize((w, h), Image.Resampling.LANCZOS)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.85, 1.15)))
        if noise is not None:
            # Upscaled photos are unnaturally smooth; a little grain gives the entropy decoder
            # camera-like work (without it JPEGs are smaller and decode faster).
            ny = int(rng.integers(0, noise.shape[0] - h + 1))
            nx = int(rng.integers(0, noise.shape[1] - w + 1))
            a = np.asarray(img, dtype=np.int16)
            a += noise[ny : ny + h, nx : nx + w]
            np.clip(a, 0, 255, out=a)
            img = Image.fromarray(a.astype(np.uint8), "RGB")
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(rng.integers(85, 93)))
        blobs.append(buf.getvalue())
    return blobs


# ---------------------------------------------------------------------------- loops


def naive_one(data: bytes) -> tuple[int, int]:
    img = Image.open(io.BytesIO(data))
    img.load()  # full-resolution decode
    img = img.convert("RGB")
    size = short_side_size(*img.size, SHORT_SIDE)
    return img.resize(size, Image.Resampling.BILINEAR).size


def run_naive(blobs: list[bytes]) -> tuple[float, list[tuple[int, int]]]:
    sizes = []
    t0 = time.perf_counter()
    for data in blobs:
        sizes.append(naive_one(data))
    return time.perf_counter() - t0, sizes


def run_validate(blobs: list[bytes], cfg: ValidateConfig) -> tuple[float, list[tuple[int, int]], list]:
    sizes, failures = [], []
    t0 = time.perf_counter()
    for i, data in enumerate(blobs):
        info = validate_image(data, cfg)
        if info.reason is not None:
            failures.append((i, info.reason, info.detail))
            sizes.append(None)
        else:
            sizes.append((info.image.shape[1], info.image.shape[0]))
        info.image = None
    return time.perf_counter() - t0, sizes, failures


# ---------------------------------------------------------------------------- main


def _pin_one_cpu() -> str:
    try:
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[-1]})
        return f"pinned to CPU {cpus[-1]} (of {len(cpus)} available)"
    except (AttributeError, OSError):
        return "not pinned (sched_setaffinity unavailable); single thread"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=240, help="number of JPEGs (>= 200 for the spec)")
    p.add_argument("--repeat", type=int, default=1, help="alternating naive/validate rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grain", type=float, default=2.0, help="sensor-like noise sigma (0 disables)")
    p.add_argument("--n-truncated", type=int, default=10)
    args = p.parse_args(argv)
    if args.n < 1 or args.repeat < 1:
        p.error("--n and --repeat must be >= 1")

    pin = _pin_one_cpu()
    cfg = ValidateConfig()
    print(f"python {platform.python_version()}, Pillow {PIL.__version__}, numpy {np.__version__}; {pin}")
    print(f"ValidateConfig: decode_short_side={cfg.decode_short_side}, draft={cfg.draft}, timeout_s={cfg.timeout_s}")

    t = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    blobs = make_corpus(args.n, rng, args.grain)
    dims = [Image.open(io.BytesIO(b)).size for b in blobs]
    mps = np.array([w * h / 1e6 for w, h in dims])
    kb = np.array([len(b) / 1024 for b in blobs])
    assert all(MIN_PX <= w * h <= MAX_PX for w, h in dims)
    print(
        f"corpus: {len(blobs)} JPEGs in {time.perf_counter() - t:.1f}s; {mps.min():.2f}-{mps.max():.2f} MP "
        f"(mean {mps.mean():.2f}), {kb.mean():.0f} KiB mean, {len(set(dims))} distinct sizes, grain sigma {args.grain}"
    )

    # Warm-up (imports, watchdog thread, libjpeg tables) outside the timed rounds.
    for data in blobs[:3]:
        naive_one(data)
        validate_image(data, cfg)

    naive_times, val_times = [], []
    for r in range(args.repeat):
        tn, naive_sizes = run_naive(blobs)
        tv, val_sizes, failures = run_validate(blobs, cfg)
        naive_times.append(tn)
        val_times.append(tv)
        print(
            f"round {r + 1}/{args.repeat}: naive {tn:.2f}s ({len(blobs) / tn:.1f} img/s), "
            f"validate {tv:.2f}s ({len(blobs) / tv:.1f} img/s)"
        )
        if failures:
            for i, reason, detail in failures[:5]:
                print(f"  image {i} {dims[i]} rejected: {reason} {detail}", file=sys.stderr)
            raise SystemExit(f"{len(failures)} of {len(blobs)} valid JPEGs failed validation")
        bad = [(i, a, b) for i, (a, b) in enumerate(zip(naive_sizes, val_sizes)) if a != b]
        if bad:
            raise SystemExit(f"output sizes differ for {len(bad)} images, e.g. (index, naive, validate) {bad[:5]}")
        assert all(min(s) == SHORT_SIDE for s in val_sizes), "output short side is not 256"

    # Truncated files must still be caught by the draft-mode fast path.
    n_trunc = min(args.n_truncated, len(blobs))
    idx = np.random.default_rng(args.seed + 1).choice(len(blobs), size=n_trunc, replace=False)
    detected = 0
    for i in idx:
        cut = blobs[i][: int(len(blobs[i]) * 0.6)]
        info = validate_image(cut, cfg)
        if info.reason == Reason.CORRUPT:
            detected += 1
        else:
            print(f"  truncated image {i} {dims[i]} NOT rejected as corrupt: {info.reason} {info.detail}", file=sys.stderr)
    print(f"truncated to 60% of bytes: {detected}/{n_trunc} rejected as '{Reason.CORRUPT.value}'")
    assert detected == n_trunc, f"only {detected}/{n_trunc} truncated JPEGs were rejected as corrupt"

    total = len(blobs) * args.repeat
    naive_ips = total / sum(naive_times)
    val_ips = total / sum(val_times)
    speedup = val_ips / naive_ips
    print(
        f"naive Pillow loop (open, full decode, RGB, resize short side {SHORT_SIDE}): "
        f"{naive_ips:.1f} img/s, {1000 / naive_ips:.2f} ms/img"
    )
    print(
        f"validate_image (DCT-scaled decode, checks, EXIF, RGB, resize, sha256, phash): "
        f"{val_ips:.1f} img/s, {1000 / val_ips:.2f} ms/img"
    )
    print("one process, one thread, pinned to one core: img/s per core = img/s")
    print(f"validate speedup over naive: {speedup:.2f}x (target >= 3x)")
    result = {
        "validate_speedup": round(speedup, 2),
        "validate_img_per_s_per_core": round(val_ips, 1),
        "naive_img_per_s_per_core": round(naive_ips, 1),
        "n_images": len(blobs),
        "mean_megapixels": round(float(mps.mean()), 2),
        "truncated_detected": detected,
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
