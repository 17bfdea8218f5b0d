"""Export a finished run's curated images as webdataset shards, on Ray Data.

    python pipeline/run.py export --output RUN_DIR [--dest DIR] [--shard-size 1000]
        [--format webp|jpeg|png|original] [--max-pixels 1048576] [--quality 90]

``curated/`` stays the source of truth; the export is derived from it:

* ``<dest>/shard-000000.tar`` ...: ``<id>.<ext>`` + ``<id>.json`` (every manifest column:
  metadata, scores, cluster ids) per image, ``shard_size`` images per shard in hash(seed,
  id) order (a shuffled training stream, the same on every export);
* ``<dest>/ATTRIBUTION.csv``: id, uri, licence, rights holder, source, title of every
  exported image (many TreeOfLife images are CC BY: attribution is required);
* ``<dest>/export.json``: settings, counts, shards; images whose bytes can no longer be
  read are listed there (never a crash), and ``_SUCCESS`` is written last.

Default format: WebP capped at 1,048,576 pixels, as the reference walkthrough did.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys

import numpy as np
import pyarrow as pa
import ray

from manifests import io as mio
from pipeline import thumbs
from pipeline.config import ConfigError, StorageConfig, load_config
from stages import export as sx
from stages.kernels.hashing import seeded_rank


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="biocurate export",
                                description="Write a finished run's curated images as webdataset shards.")
    p.add_argument("--output", required=True, help="The run directory (local or s3://).")
    p.add_argument("--dest", help="Where the shards go (default <output>/export).")
    p.add_argument("--shard-size", type=int, default=1000, help="Images per shard (default 1000).")
    p.add_argument("--format", choices=["webp", "jpeg", "png", "original"], default="webp")
    p.add_argument("--max-pixels", type=int, default=1_048_576, help="Shrink larger images (0: never).")
    p.add_argument("--quality", type=int, default=90, help="WebP/JPEG quality.")
    return p.parse_args(argv)


def _shard_of(batch: pa.Table, order) -> pa.Table:
    from pipeline.joins import resolve_ref

    ids, shard = resolve_ref(order)
    pos = np.searchsorted(ids, np.asarray(batch["id"].to_pylist(), dtype=object).astype(str))
    return batch.append_column("_shard", pa.array(shard[pos], pa.int64()))


def _write(group: pa.Table, dest: str, storage: StorageConfig, fmt: str, max_pixels: int | None, quality: int,
           seed: int, attribution: dict) -> pa.Table:
    rows = group.to_pylist()
    shard = rows[0]["_shard"]
    rank = seeded_rank(seed, [r["id"] for r in rows])  # one call for the shard, not one per row
    rows = [rows[i] for i in np.argsort(rank, kind="stable")]
    blobs = thumbs.fetch_many([r["uri"] for r in rows], storage)
    fs, root = mio.filesystem(dest, storage)
    buf = io.BytesIO()
    records = sx.write_shard(buf, rows, [blobs.get(r["uri"]) for r in rows], fmt, max_pixels, quality)
    name = f"shard-{shard:06d}.tar"
    mio.write_bytes_atomic(fs, mio.join(root, name), buf.getvalue())
    written = {r["id"] for r in records if r["written"]}
    return pa.table({
        "id": [r["id"] for r in records], "shard": [name] * len(records),
        "written": [r["written"] for r in records], "why": pa.array([r["why"] for r in records], pa.string()),
        "attribution": [json.dumps(sx.attribution_row(row, attribution)) if row["id"] in written else None
                        for row in rows],
    })


def export_run(output: str, dest: str | None = None, shard_size: int = 1000, fmt: str = "webp",
               max_pixels: int | None = 1_048_576, quality: int = 90, storage: StorageConfig | None = None) -> dict:
    """Export ``output``'s curated rows; returns the ``export.json`` content."""
    storage = storage or StorageConfig()
    fs, root = mio.filesystem(output, storage)
    if not mio.is_committed(fs, mio.join(root, "curated")):
        raise ConfigError(f"export error: {output} has no committed curated/ manifest")
    with fs.open(mio.join(root, "summary.json"), "rb") as f:
        seed = int(json.loads(f.read())["config"]["run"]["seed"])
    dest = dest or mio.join(output.rstrip("/"), "export")
    dfs, droot = mio.filesystem(dest, storage)
    mio.uncommit(dfs, droot)
    dfs.makedirs(droot, exist_ok=True)
    files = sorted(p for p in fs.find(mio.join(root, "curated")) if p.endswith(".parquet"))
    curated = ray.data.read_parquet(files, filesystem=mio.arrow_filesystem(fs))
    names = curated.schema().names
    ids = np.asarray([r["id"] for r in curated.select_columns(["id"]).take_all()], dtype=str)
    order = np.argsort(seeded_rank(seed, ids.tolist()), kind="stable")
    shard = np.empty(len(ids), np.int64)
    shard[order] = np.arange(len(ids)) // max(1, shard_size)
    by_id = np.argsort(ids)
    attribution = {"licence": sx.first_column(names, sx.LICENCE_COLUMNS),
                   "rights_holder": sx.first_column(names, sx.HOLDER_COLUMNS),
                   "source": sx.first_column(names, sx.SOURCE_COLUMNS),
                   "title": sx.first_column(names, sx.TITLE_COLUMNS)}
    n_shards = int(math.ceil(len(ids) / max(1, shard_size)))
    records = []
    if len(ids):
        ref = ray.put((ids[by_id], shard[by_id]))
        records = curated.map_batches(_shard_of, batch_format="pyarrow", fn_kwargs={"order": ref}).groupby(
            "_shard", num_partitions=max(1, min(200, n_shards))).map_groups(
            _write, batch_format="pyarrow",
            fn_kwargs={"dest": dest, "storage": storage, "fmt": fmt, "max_pixels": max_pixels or None,
                       "quality": quality, "seed": seed, "attribution": attribution}).take_all()
    written = [r for r in records if r["written"]]
    with dfs.open(mio.join(droot, "ATTRIBUTION.csv"), "w") as f:
        w = csv.DictWriter(f, fieldnames=["id", "uri", *attribution])
        w.writeheader()
        for r in sorted(written, key=lambda r: r["id"]):
            w.writerow(json.loads(r["attribution"]))
    report = {"source": output, "dest": dest, "format": fmt, "max_pixels": max_pixels, "quality": quality,
              "shard_size": shard_size, "shards": sorted({r["shard"] for r in records}),
              "images": len(written), "curated": len(ids),
              "skipped": [{"id": r["id"], "why": r["why"]} for r in records if not r["written"]],
              "attribution_columns": attribution}
    with dfs.open(mio.join(droot, "export.json"), "wb") as f:
        f.write(json.dumps(report, indent=2).encode())
    mio.write_marker(dfs, droot, {"images": len(written), "shards": len(report["shards"])})
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.shard_size < 1:
            raise ConfigError("export error: --shard-size must be >= 1")
        from pipeline.plan import init_ray

        init_ray(load_config(None, {"input.path": args.output, "output": args.output}))  # local Ray or run.address
        report = export_run(args.output, args.dest, args.shard_size, args.format, args.max_pixels, args.quality)
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    print(f"biocurate: exported {report['images']} of {report['curated']} curated images to "
          f"{len(report['shards'])} shards in {report['dest']}"
          + (f" ({len(report['skipped'])} skipped, see export.json)" if report["skipped"] else ""))
    return 0
