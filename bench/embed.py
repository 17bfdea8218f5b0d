"""Benchmark: the embedding stage through Ray Data vs a bare torch loop; decode cost; GPU mode.

Usage (from the repo root)::

    python bench/embed.py [--n 2000] [--threads 2] [--batch 64]          # CPU, MobileNetV2
    python bench/embed.py --gpu [--n 4096] [--batch 256] [--workers 14]   # GPU mode, no Ray

CPU mode (what this repository's CI machines can run):

* corpus: ``--n`` JPEGs of 0.3-1 MP (TreeOfLife-like sizes) cut from real photographs
  shipped with scikit-image/scikit-learn, encoded at quality 88-92;
* decode cost, one thread: the pipeline's decode (libjpeg DCT scaling to the smallest scale
  covering the model input, EXIF, then ``model_input``) vs a full decode followed by the
  same resize, in ms per image; with it, the CPU cores one GPU needs at 2,500 images/s;
* embed stage: the same model inputs (uint8 224x224) through (a) a bare loop in this
  process -- ``load_backbone`` then batches of ``--batch`` -- and (b) Ray Data:
  ``map_batches(EmbedModels, compute=ActorPoolStrategy(size=1), num_cpus=--threads)``
  over blocks already in the object store, both with ``--threads`` torch threads (Ray
  sets OMP_NUM_THREADS from the actor's num_cpus; EmbedModels sets torch's count too).
  Throughput is steady state: images after the first batch over the time from the first
  batch's end (in (b): its arrival at the driver, streaming) to the last. The one-time cost
  -- building the model in (a); starting the actor process, importing torch and loading the
  model in (b) -- is reported apart (``*_with_startup``, ``actor_start_s``): it is fixed per
  actor, seconds against runs of hours. Runs alternate bare, pipeline, bare, pipeline
  (``--repeat`` rounds); the best of each is compared. The embeddings of (a) and (b) must
  agree (max abs difference printed).

GPU mode (``--gpu``; needs only torch, plus Pillow for CPU decode -- no Ray, no repository
imports, no network): ViT-L/14 (Birder's ``vit_l14_pn`` with random weights when Birder is
installed, else an equivalent pure-torch ViT-L/14 with its 768-d projection), bf16
autocast, channels_last, batch ``--batch``. Two figures: the model alone on uint8 batches
already on the GPU, and end to end from JPEG bytes (``bench/data/*.jpg`` repeated to
``--n``) with ``--workers`` CPU processes decoding at DCT scale and resizing, pinned
memory, non-blocking copies. Target: >= 2,500 images/s on one H100.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data"


# ============================================================================ GPU mode (torch only)

def _vit_l14(dim_out: int = 768):
    """ViT-L/14 at 224 px (24 blocks, width 1024, 16 heads, MLP 4096, pre-norm) with a
    1024->768 projection: the compute of CLIP/BioCLIP-2 L/14 image towers."""
    import torch
    from torch import nn

    try:
        from birder.model_registry import registry

        net = registry.net_factory("vit_l14_pn", dim_out, size=(224, 224))
        return net, "birder vit_l14_pn (random weights)"
    except ImportError:
        pass

    class Block(nn.Module):
        def __init__(self, d=1024, heads=16):
            super().__init__()
            self.n1, self.n2, self.heads = nn.LayerNorm(d), nn.LayerNorm(d), heads
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(a)
            return x + self.mlp(self.n2(x))

    class ViT(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 1024, 14, 14)
            self.cls = nn.Parameter(torch.zeros(1, 1, 1024))
            self.pos = nn.Parameter(torch.zeros(1, 257, 1024))
            self.pre, self.post = nn.LayerNorm(1024), nn.LayerNorm(1024)
            self.blocks = nn.Sequential(*[Block() for _ in range(24)])
            self.head = nn.Linear(1024, dim_out, bias=False)

        def forward(self, x):
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            x = self.post(self.blocks(self.pre(x)))
            return self.head(x[:, 0])

    return ViT(), "pure-torch ViT-L/14 (random weights)"


def _decode_one(data: bytes, size: int = 224):
    """DCT-scaled decode covering ``size`` then a bicubic squash to (size, size): the
    pipeline's preprocessing, as a plain function for worker processes."""
    import numpy as np
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    w, h = img.size
    scale = size / min(w, h)
    if scale < 1:
        img.draft("RGB", (max(1, int(w * scale + 0.999)), max(1, int(h * scale + 0.999))))
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BICUBIC))


def _decode_chunk(blobs: list[bytes]):
    import numpy as np

    return np.stack([_decode_one(b) for b in blobs])


def gpu_mode(args) -> dict:
    import torch

    device = torch.device(args.device)
    net, what = _vit_l14()
    net = net.to(device).eval().to(memory_format=torch.channels_last)
    if args.compile:
        net = torch.compile(net)
    mean = torch.tensor([0.481, 0.458, 0.408], device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.269, 0.261, 0.276], device=device).view(1, 3, 1, 1) * 255
    cuda = device.type == "cuda"

    @torch.inference_mode()
    def run(x_uint8):  # (n, 224, 224, 3) uint8 on device
        x = ((x_uint8.permute(0, 3, 1, 2).float() - mean) / std).contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            return torch.nn.functional.normalize(net(x).float(), dim=-1)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    b = args.batch
    x = torch.randint(0, 256, (b, 224, 224, 3), dtype=torch.uint8, device=device)
    for _ in range(args.warmup):
        run(x)
    sync()
    steps = max(1, args.n // b)
    t0 = time.perf_counter()
    for _ in range(steps):
        run(x)
    sync()
    model_ips = steps * b / (time.perf_counter() - t0)

    e2e_ips, decode_note = None, "Pillow not installed: end-to-end figure skipped"
    files = sorted(DATA.glob("*.jpg"))
    try:
        import PIL  # noqa: F401
    except ImportError:
        files = []
    if files:
        from concurrent.futures import ProcessPoolExecutor

        base = [f.read_bytes() for f in files]
        blobs = [base[i % len(base)] for i in range(steps * b)]
        chunks = [blobs[i : i + b] for i in range(0, len(blobs), b)]
        with ProcessPoolExecutor(args.workers) as pool:
            list(pool.map(_decode_chunk, chunks[: args.workers]))  # start and warm the workers
            sync()
            t0 = time.perf_counter()
            for arr in pool.map(_decode_chunk, chunks):
                t = torch.from_numpy(arr)
                if cuda:
                    t = t.pin_memory()
                run(t.to(device, non_blocking=True))
            sync()
            e2e_ips = len(blobs) / (time.perf_counter() - t0)
        decode_note = f"{args.workers} decode processes, {len(files)} distinct JPEGs repeated"
    return {"mode": "gpu", "device": torch.cuda.get_device_name(0) if cuda else "cpu", "model": what,
            "batch": b, "images": steps * b, "model_img_per_s": round(model_ips, 1),
            "e2e_img_per_s": round(e2e_ips, 1) if e2e_ips else None, "decode": decode_note,
            "target_img_per_s": 2500, "torch": torch.__version__}


# ============================================================================ CPU mode (the pipeline)

def _corpus(n: int, seed: int) -> list[bytes]:
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(HERE.parent))
    from pipeline.testdata import images

    rng = np.random.default_rng(seed)
    photos = list(images.photos().values())
    out = []
    for i in range(n):
        src = photos[i % len(photos)]
        sh, sw = src.shape[:2]
        f = rng.uniform(0.6, 1.0)
        cw, ch = int(sw * f), int(sh * f)
        x0, y0 = int(rng.integers(0, sw - cw + 1)), int(rng.integers(0, sh - ch + 1))
        px = rng.uniform(0.3e6, 1.0e6)
        scale = (px / (cw * ch)) ** 0.5
        img = Image.fromarray(src[y0 : y0 + ch, x0 : x0 + cw]).convert("RGB")
        img = img.resize((max(16, int(cw * scale)), max(16, int(ch * scale))), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=int(rng.integers(88, 93)))
        out.append(buf.getvalue())
    return out


def cpu_mode(args) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(HERE.parent))
    from manifests.config import ValidateConfig
    from stages import embed as emb
    from stages.backbones import load_backbone, model_input, spec
    from stages.validate import validate_image

    print(f"building {args.n} JPEGs ...", file=sys.stderr)
    blobs = _corpus(args.n, args.seed)
    s = spec("mobilenet_v2_imagenet")
    cfg = ValidateConfig()

    # --- decode cost, one thread
    torch.set_num_threads(1)
    sub = blobs[: min(len(blobs), 300)]
    t0 = time.perf_counter()
    for d in sub:
        model_input(validate_image(d, cfg, cover=s.size).decoded, s.size)
    draft_ms = (time.perf_counter() - t0) / len(sub) * 1000
    t0 = time.perf_counter()
    for d in sub:
        model_input(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")), s.size)
    full_ms = (time.perf_counter() - t0) / len(sub) * 1000

    # --- model inputs for the embed stage (the pipeline's CPU side)
    inputs = np.stack([model_input(validate_image(d, cfg, cover=s.size).decoded, s.size) for d in blobs])
    print(f"decode: draft {draft_ms:.2f} ms/img, full {full_ms:.2f} ms/img; inputs {inputs.shape}", file=sys.stderr)

    T, B = args.threads, args.batch

    def bare() -> tuple[float, float, np.ndarray]:
        """(steady img/s after the first batch, img/s including the model build, embeddings)"""
        torch.set_num_threads(T)
        t0 = time.perf_counter()
        bb = load_backbone("mobilenet_v2_imagenet")
        out, t_first = [], None
        for i in range(0, len(inputs), B):
            out.append(bb(torch.from_numpy(inputs[i : i + B])).numpy())
            t_first = t_first or time.perf_counter()
        t_end = time.perf_counter()
        return (len(inputs) - len(out[0])) / (t_end - t_first), len(inputs) / (t_end - t0), np.concatenate(out)

    import pyarrow as pa
    import ray

    ray.init(num_cpus=T, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE.parent)}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    plan = emb.ModelPlan(s, None, "bench", emb.prep_signature(s), "float32")
    blocks = []
    for i in range(0, len(inputs), B):
        chunk = inputs[i : i + B]
        blocks.append(pa.table({
            "id": [str(j) for j in range(i, i + len(chunk))],
            emb.pixels_column(s.size): pa.array([c.tobytes() for c in chunk], pa.binary(s.size * s.size * 3)),
            emb.need_column(s.name): pa.array([True] * len(chunk)),
        }))
    ds_in = ray.data.from_arrow_refs([ray.put(b) for b in blocks])

    class TimedEmbed(emb.EmbedModels):
        """EmbedModels stamping when the actor was ready and when each batch was done (its
        own clock: driver-side arrival times are bunched by streaming back-pressure)."""

        def __post_init__(self):
            super().__post_init__()
            self.t_ready = time.time()

        def __call__(self, batch):
            out = super().__call__(batch)
            return (out.append_column("_t_done", pa.array([time.time()] * len(out)))
                    .append_column("_t_ready", pa.array([self.t_ready] * len(out))))

    def pipeline() -> tuple[float, float, np.ndarray]:
        """The same figures for the Ray Data stage, from the actor's timestamps."""
        t0 = time.time()
        out = ds_in.map_batches(
            TimedEmbed, batch_format="pyarrow", batch_size=B, compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=T, fn_constructor_kwargs={"plans": [plan], "batch_size": B, "num_threads": T},
        ).materialize()
        t_end = time.time()
        rows = sorted(out.take_all(), key=lambda r: int(r["id"]))
        done = sorted({r["_t_done"]: None for r in rows})
        n_first = sum(1 for r in rows if r["_t_done"] == done[0])
        steady = (len(rows) - n_first) / (done[-1] - done[0])
        return steady, len(rows) / (t_end - t0), np.array([r[plan.column] for r in rows], dtype=np.float32)

    bare_r, pipe_r = [], []
    for r in range(args.repeat):
        *figs, ref = bare()
        bare_r.append(figs)
        *figs, got = pipeline()
        pipe_r.append(figs)
        print(f"round {r}: bare {bare_r[-1][0]:.1f} img/s ({bare_r[-1][1]:.1f} with the model build), "
              f"pipeline {pipe_r[-1][0]:.1f} img/s ({pipe_r[-1][1]:.1f} with the actor start)", file=sys.stderr)
    assert len(got) == len(ref)
    max_diff = float(np.abs(ref - got).max())
    ray.shutdown()
    bare_ips, pipe_ips = max(b[0] for b in bare_r), max(p[0] for p in pipe_r)
    bare_all, pipe_all = max(b[1] for b in bare_r), max(p[1] for p in pipe_r)
    return {
        "mode": "cpu", "model": s.name, "images": len(inputs), "threads": T, "batch": B,
        "pipeline_vs_bare": round(pipe_ips / bare_ips, 3),
        "pipeline_img_per_s": round(pipe_ips, 1), "bare_img_per_s": round(bare_ips, 1),
        "pipeline_vs_bare_with_startup": round(pipe_all / bare_all, 3),
        "actor_start_s": round(len(inputs) / pipe_all - len(inputs) / pipe_ips, 1),
        "max_abs_diff": max_diff,
        "draft_decode_ms": round(draft_ms, 2), "full_decode_ms": round(full_ms, 2),
        "full_vs_draft_decode": round(full_ms / draft_ms, 2),
        "cores_per_gpu_at_2500_img_s": round(2500 * draft_ms / 1000, 1),
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true", help="GPU mode: ViT-L/14 bf16, no Ray, torch only.")
    p.add_argument("--n", type=int, default=None, help="images (CPU default 2000; GPU default 4096)")
    p.add_argument("--batch", type=int, default=None, help="batch size (CPU default 64; GPU default 256)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                   help="CPU mode: torch threads in both loops (default: all cores but one, which Ray's "
                   "driver and raylet need; with every core given to torch they preempt its threads)")
    p.add_argument("--repeat", type=int, default=2, help="CPU mode: alternating rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help="GPU mode: torch device (cpu to smoke-test the script)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="GPU mode: decode processes")
    p.add_argument("--warmup", type=int, default=3, help="GPU mode: warm-up batches")
    p.add_argument("--compile", action="store_true", help="GPU mode: torch.compile the model")
    args = p.parse_args(argv)
    if args.gpu:
        args.n, args.batch = args.n or 4096, args.batch or 256
        result = gpu_mode(args)
    else:
        args.n, args.batch = args.n or 2000, args.batch or 64
        result = cpu_mode(args)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
