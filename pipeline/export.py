"""Export a finished run's curated images as webdataset shards, on Ray Data.

    python pipeline/run.py export --output RUN_DIR [--dest DIR] [--shard-size 1000]
        [--format webp|jpeg|png|original] [--max-pixels 1048576] [--quality 90]

``curated/`` stays the source of truth; the export is derived from it:

* ``<dest>/shard-000000.tar`` ...: ``<id>.<ext>`` + ``<id>.json`` (every manifest column:
  metadata, scores, cluster ids) per image, ``shard_size`` images per shard in hash(seed,
  id) order (a shuffled training stream, the same on every export);
* ``<dest>/ATTRIBUTION.csv``: id, uri, licence, rights holder, source, title of every
  exported image (many TreeOfLife images are CC BY: attribution is required); every cell
  is safe to open in a spreadsheet (a value starting with = + - @ is escaped);
* ``<dest>/export.json``: settings, counts, shards; images not written are listed there
  with why (never a crash): bytes that can no longer be read, that changed since the run
  (sha256), or past the run's ``validate`` limits; ``_SUCCESS`` is written last.

The destination is replaced only when it is empty or holds a previous export (its
``.biocurate-export`` file, written before anything else, so an interrupted export is
recognized too), and then only the files an export writes are deleted. The run directory,
its parents, any other folder inside the run than ``<run>/export``, a bucket root and a
non-empty folder without that file are refused (``ConfigError``, exit 2): nothing is
deleted.

Default format: WebP capped at 1,048,576 pixels, as the reference walkthrough did.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import posixpath
import re
import sys
import time

import numpy as np
import pyarrow as pa

from manifests import io as mio
from pipeline import thumbs
from manifests.config import ConfigError, StorageConfig, ValidateConfig, load_config
from stages import export as sx
from stages.kernels.hashing import seeded_rank

KIND = "biocurate-export"
IDENTITY = ".biocurate-export"  # written first: a folder holding it is an export (maybe interrupted)
# What an export writes (and so may delete when it replaces one): nothing else is touched.
OWN_FILES = re.compile(r"(shard-\d{6,}\.tar|ATTRIBUTION\.csv|export\.json|_SUCCESS|\.biocurate-export)"
                       r"|\.(shard-\d{6,}\.tar|ATTRIBUTION\.csv|export\.json|\.biocurate-export)\.tmp-[0-9a-f]{12}")


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


def _canonical(fs, path: str) -> str:
    """``path`` comparable with another on the same store: symlinks resolved locally."""
    if mio.is_remote(mio.to_uri(fs, path)):
        return path.rstrip("/")
    return os.path.realpath(path)


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _is_export(fs, root: str, names: set[str]) -> bool:
    """Whether the folder ``root`` (holding ``names``) is a previous export: its identity
    file, or an ``export.json`` of ours (also those written before the identity file)."""
    for name in (IDENTITY, "export.json"):
        if name not in names:
            continue
        try:
            meta = json.loads(fs.cat_file(mio.join(root, name)))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and (meta.get("kind") == KIND
                                       or {"shards", "attribution_columns", "curated"} <= meta.keys()):
            return True
    return False


def check_dest(output: str, dest: str, storage: StorageConfig) -> list[str]:
    """Refuse a destination an export must not replace (``ConfigError``, nothing deleted):
    the run directory, one of its parents, a folder inside the run other than
    ``<run>/export``, a bucket root, a file, a non-empty folder that holds no export.
    Returns the paths of the files a previous export there wrote (to delete)."""
    fs, root = mio.filesystem(output, storage)
    dfs, droot = mio.filesystem(dest, storage)
    if mio.is_remote(mio.to_uri(fs, root)) == mio.is_remote(mio.to_uri(dfs, droot)):
        run, target = _canonical(fs, root), _canonical(dfs, droot)
        if _within(run, target):
            raise ConfigError(f"export error: --dest {dest} is the run directory {output} or one of its parents "
                              "(nothing was deleted)")
        if _within(target, run) and target != mio.join(run, "export"):
            raise ConfigError(f"export error: --dest {dest} is inside the run directory {output}; the only folder "
                              "an export may use there is export/ (nothing was deleted)")
    if mio.is_remote(mio.to_uri(dfs, droot)) and "/" not in droot.strip("/"):
        raise ConfigError(f"export error: --dest {dest} is a bucket root; export into a prefix such as "
                          f"{dest.rstrip('/')}/export (nothing was deleted)")
    if dfs.isfile(droot):
        raise ConfigError(f"export error: --dest {dest} is a file, not a folder (nothing was deleted)")
    try:
        entries = {posixpath.basename(e["name"].rstrip("/")): e for e in dfs.ls(droot, detail=True)}
    except FileNotFoundError:
        entries = {}
    if entries and not _is_export(dfs, droot, set(entries)):
        raise ConfigError(f"export error: --dest {dest} is not empty and holds no previous export (no {IDENTITY}); "
                          "choose an empty or new folder (nothing was deleted)")
    return [e["name"] for name, e in entries.items() if OWN_FILES.fullmatch(name) and e.get("type") == "file"]


def _start(dfs, droot: str, previous: list[str], output: str) -> None:
    """Replace a previous export's files (its marker first, so it never looks complete)
    and write this export's identity before anything else."""
    marker = mio.join(droot, mio.SUCCESS)
    if marker in previous:
        dfs.rm(marker)
    rest = [p for p in previous if p != marker]
    if rest:
        dfs.rm(rest)
    dfs.makedirs(droot, exist_ok=True)
    mio.write_bytes_atomic(dfs, mio.join(droot, IDENTITY), json.dumps(
        {"kind": KIND, "source": output, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}).encode())


def open_run(output: str, storage: StorageConfig) -> dict:
    """The finished run's ``summary.json`` (``ConfigError`` when ``curated/`` is not committed)."""
    fs, root = mio.filesystem(output, storage)
    if not mio.is_committed(fs, mio.join(root, "curated")):
        raise ConfigError(f"export error: {output} has no committed curated/ manifest")
    with fs.open(mio.join(root, "summary.json"), "rb") as f:
        return json.loads(f.read())


def _shard_of(batch: pa.Table, order) -> pa.Table:
    from pipeline.joins import resolve_ref

    ids, shard = resolve_ref(order)
    pos = np.searchsorted(ids, np.asarray(batch["id"].to_pylist(), dtype=object).astype(str))
    return batch.append_column("_shard", pa.array(shard[pos], pa.int64()))


def _write(group: pa.Table, dest: str, storage: StorageConfig, fmt: str, max_pixels: int | None, quality: int,
           seed: int, attribution: dict, limits: ValidateConfig, bytes_column: str) -> pa.Table:
    rows = group.to_pylist()
    shard = rows[0]["_shard"]
    rank = seeded_rank(seed, [r["id"] for r in rows])  # one call for the shard, not one per row
    rows = [rows[i] for i in np.argsort(rank, kind="stable")]
    blobs = thumbs.fetch_many([r["uri"] for r in rows], storage, bytes_column, limits.max_bytes)
    fs, root = mio.filesystem(dest, storage)
    buf = io.BytesIO()
    records = sx.write_shard(buf, rows, [blobs.get(r["uri"]) for r in rows], fmt, max_pixels, quality, limits)
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
    """Export ``output``'s curated rows; returns the ``export.json`` content. Source bytes
    are checked against the manifest's sha256 and decoded under the run's ``validate``
    limits; ``dest`` is checked by :func:`check_dest` before anything is deleted."""
    storage = storage or StorageConfig()
    summary = open_run(output, storage)
    fs, root = mio.filesystem(output, storage)
    config = summary.get("config") or {}
    seed = int(config["run"]["seed"])
    limits = thumbs.limits_of(config)
    bytes_column = (config.get("input") or {}).get("bytes_column") or "image"
    dest = dest or mio.join(output.rstrip("/"), "export")
    previous = check_dest(output, dest, storage)
    dfs, droot = mio.filesystem(dest, storage)
    _start(dfs, droot, previous, output)
    import ray  # here: `biocurate export --help` needs no Ray

    from pipeline import joins  # (imports ray too)

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
        records = joins.map_groups(
            curated.map_batches(_shard_of, batch_format="pyarrow", fn_kwargs={"order": ref}), "_shard", _write,
            max(1, min(200, n_shards)),
            {"dest": dest, "storage": storage, "fmt": fmt, "max_pixels": max_pixels or None, "quality": quality,
             "seed": seed, "attribution": attribution, "limits": limits, "bytes_column": bytes_column}).take_all()
    written = [r for r in records if r["written"]]
    csv_text = io.StringIO()
    w = csv.DictWriter(csv_text, fieldnames=["id", "uri", *attribution])
    w.writeheader()
    for r in sorted(written, key=lambda r: r["id"]):
        w.writerow(json.loads(r["attribution"]))
    mio.write_bytes_atomic(dfs, mio.join(droot, "ATTRIBUTION.csv"), csv_text.getvalue().encode())
    report = {"kind": KIND, "source": output, "dest": dest, "format": fmt, "max_pixels": max_pixels,
              "quality": quality, "shard_size": shard_size, "shards": sorted({r["shard"] for r in records}),
              "images": len(written), "curated": len(ids),
              "skipped": [{"id": r["id"], "why": r["why"]} for r in records if not r["written"]],
              "attribution_columns": attribution, "validate_limits": limits.model_dump()}
    mio.write_bytes_atomic(dfs, mio.join(droot, "export.json"), json.dumps(report, indent=2).encode())
    mio.write_marker(dfs, droot, {"kind": KIND, "images": len(written), "shards": len(report["shards"])})
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.shard_size < 1:
            raise ConfigError("export error: --shard-size must be >= 1")
        open_run(args.output, StorageConfig())  # refused before Ray starts: a one-line error, nothing deleted
        check_dest(args.output, args.dest or mio.join(args.output.rstrip("/"), "export"), StorageConfig())
        from pipeline.rundir import init_ray

        init_ray(load_config(None, {"input.path": args.output, "output": args.output}))  # local Ray or run.address
        report = export_run(args.output, args.dest, args.shard_size, args.format, args.max_pixels, args.quality)
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    print(f"biocurate: exported {report['images']} of {report['curated']} curated images to "
          f"{len(report['shards'])} shards in {report['dest']}"
          + (f" ({len(report['skipped'])} skipped, see export.json)" if report["skipped"] else ""))
    return 0
