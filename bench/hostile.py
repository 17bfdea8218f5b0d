"""Benchmark: validate over a hostile suite -- slowest file and worker memory.

Usage (from the repo root)::

    python bench/hostile.py [--copies 10] [--batch 32] [--cover 224] [--seed 0] [--small]

Builds the suite on the fly (``pipeline.testdata.hostile``, no binary fixtures): progressive JPEGs
with hundreds of scans (4096x4096 and near ``max_pixels``), a 10-scan and a 100-scan
progressive JPEG near ``max_pixels``, 16-bit and RGBA PNGs near ``max_pixels``, a
near-max lossless WebP and deflate TIFF, decompression-bomb headers (PNG, GIF, TIFF, WebP),
truncated files, a few ordinary images, and -- when ``pipeline.testdata.hostile`` has them -- the
webdataset shards (a gzip bomb ``.tar.gz``, a huge sidecar), read through
``stages.ingest.iter_shard`` (their rows join the suite).

The suite times ``--copies`` is shuffled (seeded) and validated in this one process in
batches of ``--batch`` rows, as a Ray worker does it: ``validate_batch_decodes`` with
``cover`` (the largest model input), default ``ValidateConfig`` (``max_pixels``,
``timeout_s`` 5). Measured:

* each file's seconds (its ``decode_ms``; the start of a decode process is not counted);
* the RSS growth of this process per batch: the peak during the batch (``VmHWM`` after
  resetting it through ``/proc/self/clear_refs``) minus the RSS before it, with every
  row's kept decode alive until the batch ends;
* the RSS growth of the decode child process: its peak (``VmHWM``, sampled every 20 ms
  while it lives) minus the RSS of an idle, warmed-up child;
* reading each shard: seconds and RSS growth.

The last line printed is one JSON object: ``max_file_s``, ``timeout_s``,
``max_file_over_timeout_s`` (``max_file_s - timeout_s``), ``max_rss_growth_mb`` (the
largest of the worker's and the child's growth), ``files``. Targets at default
``max_pixels``: ``max_file_over_timeout_s <= 1``, ``max_rss_growth_mb <= 512``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from manifests.schema import BYTES  # noqa: E402
from pipeline.testdata import hostile, images  # noqa: E402
from manifests.config import StorageConfig, ValidateConfig  # noqa: E402
from stages import decode_pool  # noqa: E402
from manifests.rejects import reject_rows  # noqa: E402
from stages.validate import validate_batch_decodes  # noqa: E402

CHILD = "stages.validate:decode_in_child"
MB = 1 << 20


# ---------------------------------------------------------------------------- memory

def _status_kb(pid: int | str, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def _reset_peak(pid: int | str = "self") -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


class ChildPeak(threading.Thread):
    """Samples the decode child's VmHWM (whichever child is current) every 20 ms."""

    def __init__(self, child: decode_pool.DecodeProcess):
        super().__init__(daemon=True)
        self.child, self.peak_kb, self.stop = child, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.02):
            pid = self.child.pid
            hwm = _status_kb(pid, "VmHWM") if pid else None
            if hwm:
                self.peak_kb = max(self.peak_kb, hwm)


# ---------------------------------------------------------------------------- suite

def decode_suite(small: bool) -> list[tuple[str, bytes]]:
    """(name, bytes) of the decode-level hostile files and a few ordinary ones."""
    side = 4096 if small else 9440  # 9440^2 = 89.1 MP, under the default max_pixels 89,478,485
    webp_w, webp_h = (4096, 4096) if small else (16383, 5461)  # WebP sides are at most 16383
    t = time.perf_counter()
    prog10 = hostile.progressive_jpeg(4096, 4096, 10)
    png = hostile.large_png(3000, 2000, "RGB")
    webp = hostile.large_webp(2000, 1500)
    tiff = hostile.large_tiff(3000, 2000)
    suite = [
        ("jpeg_883_scans_4096", hostile.progressive_jpeg(4096, 4096, 883)),
        (f"jpeg_883_scans_{side}", hostile.progressive_jpeg(side, side, 883)),
        (f"jpeg_100_scans_{side}", hostile.progressive_jpeg(side, side, 100)),
        (f"jpeg_10_scans_{side}", hostile.progressive_jpeg(side, side, 10)),
        (f"png16_{side}", hostile.large_png(side, side, "I;16")),
        (f"png_rgba_{side}", hostile.large_png(side, side, "RGBA")),
        (f"webp_lossless_{webp_w}x{webp_h}", hostile.large_webp(webp_w, webp_h)),
        (f"tiff_deflate_{side}", hostile.large_tiff(side, side)),
        ("bomb_png_40000", images.png_with_header_size(40000, 40000)),
        ("bomb_gif_65535", hostile.gif_with_header_size(65535, 65535)),
        ("bomb_tiff_100000", hostile.tiff_with_header_size(100000, 100000)),
        ("bomb_webp_16384", hostile.webp_with_header_size(16384, 16384)),
        ("truncated_progressive_jpeg", hostile.truncated(prog10)),
        ("truncated_png", hostile.truncated(png)),
        ("truncated_webp", hostile.truncated(webp)),
        ("truncated_tiff", hostile.truncated(tiff)),
    ]
    suite += [(f"good_{name}", data) for name, data in images.good_images().items()]
    sizes = ", ".join(f"{n} {len(d) / 1e3:.0f} KB" for n, d in suite[:8])
    print(f"built {len(suite)} files in {time.perf_counter() - t:.1f}s: {sizes}", flush=True)
    return suite


def shard_rows(tmp: Path, small: bool) -> tuple[list[tuple[str, pa.Table]], list[dict]]:
    """Rows of the hostile shards (read through stages.ingest.iter_shard) and one measure
    per shard read; empty when pipeline.testdata.hostile has no shard builders."""
    if not (hasattr(hostile, "gzip_bomb_tar") and hasattr(hostile, "huge_sidecar_tar")):
        print("shards: pipeline.testdata.hostile has no shard builders; skipped", flush=True)
        return [], []
    from stages.ingest import iter_shard

    jpg = images.good_images()["astronaut.jpg"]
    shards = {
        "gzip_bomb.tar.gz": hostile.gzip_bomb_tar(tmp / "gzip_bomb.tar.gz", (256 if small else 2048) * MB,
                                                  after=[("s/0001.jpg", jpg)]),
        "huge_sidecar.tar": hostile.huge_sidecar_tar(tmp / "huge_sidecar.tar", jpg, 64 * MB),
    }
    out, reads = [], []
    for name, path in shards.items():
        _reset_peak()
        rss0, t0 = _status_kb("self", "VmRSS"), time.perf_counter()
        tables = list(iter_shard(str(path), StorageConfig(), ["jpg", "png", "webp"], 256))
        took, growth = time.perf_counter() - t0, (_status_kb("self", "VmHWM") - rss0) / 1024
        rows = pa.concat_tables(tables) if tables else None
        reasons = Counter(rows.column("reason").to_pylist()) if rows is not None else Counter()
        reads.append({"shard": name, "file_kb": path.stat().st_size // 1024, "s": round(took, 3),
                      "rss_growth_mb": round(growth, 1), "rows": 0 if rows is None else len(rows),
                      "reasons": dict(reasons)})
        print(f"shard {name} ({path.stat().st_size / 1e3:.0f} KB): read in {took:.2f}s, RSS +{growth:.0f} MB, "
              f"rows {dict(reasons)}", flush=True)
        if rows is not None:
            out.append((name, rows))
    return out, reads


# ---------------------------------------------------------------------------- run

def _table(items: list[tuple[str, bytes]]) -> pa.Table:
    ids = [f"{name}#{i}" for i, (name, _) in enumerate(items)]
    table = pa.table({"id": ids, "uri": [n for n, _ in items], BYTES: pa.array([d for _, d in items], pa.binary())})
    return reject_rows(table, "ingest", [None] * len(items))


def _batches(rows: pa.Table, size: int):
    for start in range(0, len(rows), size):
        yield rows.slice(start, size)


def run(rows: pa.Table, cfg: ValidateConfig, cover: int, batch: int) -> tuple[pa.Table, float]:
    """Validate ``rows`` in batches; (results, largest RSS growth of this process in MB)."""
    outs, worst = [], 0.0
    for part in _batches(rows, batch):
        _reset_peak()
        rss0 = _status_kb("self", "VmRSS")
        out, decodes = validate_batch_decodes(part, cfg, cover)
        worst = max(worst, (_status_kb("self", "VmHWM") - rss0) / 1024)
        kept = sum(d.nbytes for d in decodes if d is not None) / MB
        print(f"  batch of {len(part)}: {np.nanmax(out.column('decode_ms').to_numpy(zero_copy_only=False).astype(float)) / 1000:.2f}s "
              f"slowest, kept decodes {kept:.1f} MB, RSS growth so far max {worst:.0f} MB", flush=True)
        outs.append(out.select(["uri", "reason", "detail", "decode_ms"]))
        del out, decodes
    return pa.concat_tables(outs), worst


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--batch", type=int, default=32, help="rows per batch (run.batch_size)")
    p.add_argument("--cover", type=int, default=224, help="largest model input (0: embeddings off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--small", action="store_true", help="4096-px files instead of near max_pixels (quick check)")
    args = p.parse_args(argv)
    cfg = ValidateConfig()
    print(f"ValidateConfig: max_pixels={cfg.max_pixels}, timeout_s={cfg.timeout_s}, "
          f"max_jpeg_scans={cfg.max_jpeg_scans}, isolate_over_s={cfg.isolate_over_s}; cover={args.cover}, "
          f"batch={args.batch}, copies={args.copies}", flush=True)

    suite = decode_suite(args.small)
    with tempfile.TemporaryDirectory() as tmp:
        shard_tables, reads = shard_rows(Path(tmp), args.small)
    # Warm up outside the measures: imports, then an idle child's RSS as its baseline.
    child = decode_pool.shared(CHILD)
    run(_table([("warm_tiff", dict(suite)["good_rocket.tiff"])] * 2), cfg, args.cover, args.batch)
    child_idle_kb = _status_kb(child.pid, "VmRSS")
    sampler = ChildPeak(child)
    sampler.start()

    tables = [_table(suite)] * args.copies
    for name, rows in shard_tables:
        tables += [rows.select(_table([]).column_names)] * args.copies
    rows = pa.concat_tables(tables)
    rows = rows.take(np.random.default_rng(args.seed).permutation(len(rows)))
    t0 = time.perf_counter()
    out, worker_mb = run(rows, cfg, args.cover, args.batch)
    wall = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    child_mb = max(0.0, (sampler.peak_kb - child_idle_kb) / 1024) if child_idle_kb else 0.0

    secs = out.column("decode_ms").to_numpy(zero_copy_only=False) / 1000
    secs = np.nan_to_num(secs.astype(float), nan=0.0)  # upstream rejects were not validated
    by_file: dict[str, list] = defaultdict(list)
    for uri, reason, s in zip(out.column("uri").to_pylist(), out.column("reason").to_pylist(), secs):
        by_file[uri].append((s, reason))
    print(f"\n{'file':36s} {'max s':>7s}  reasons")
    for uri, v in sorted(by_file.items(), key=lambda kv: -max(s for s, _ in kv[1])):
        print(f"{uri[:36]:36s} {max(s for s, _ in v):7.2f}  {dict(Counter(r or 'ok' for _, r in v))}")
    slowest = out.column("uri")[int(np.argmax(secs))].as_py()
    print(f"\n{len(out)} rows in {wall:.1f}s; slowest file {slowest} {secs.max():.2f}s; worker RSS growth "
          f"{worker_mb:.0f} MB (largest batch), decode child {child_mb:.0f} MB over its idle "
          f"{(child_idle_kb or 0) / 1024:.0f} MB; decode children started {child.started}")
    result = {"max_file_s": round(float(secs.max()), 3), "timeout_s": cfg.timeout_s,
              "max_file_over_timeout_s": round(float(secs.max()) - cfg.timeout_s, 3),
              "max_rss_growth_mb": round(max(worker_mb, child_mb, *(r["rss_growth_mb"] for r in reads)), 1),
              "files": len(out), "worker_rss_growth_mb": round(worker_mb, 1),
              "child_rss_growth_mb": round(child_mb, 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
