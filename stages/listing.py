"""Listing inputs: which files of a folder or S3 prefix are images, shards or tables,
how to list a large tree in parallel tasks, and the account of the files a listing passes
over (``input_skipped`` in ``summary.json``) so that nothing disappears unexplained.

Ray-free; ``stages.ingest`` re-exports the listing functions, ``pipeline.plan`` runs them
in Ray tasks and sums their :class:`Skipped` reports.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass, field

from manifests.io import filesystem, is_remote, join, to_uri, write_bytes_atomic
from manifests.config import StorageConfig

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json", ".ndjson": "json"}

IMAGE, SHARD, TABLE, HIDDEN, OTHER = "image", "shard", "table", "hidden", "other"

# Kind detection looks at one page of keys: one S3 list_objects_v2 call (S3 returns at
# most 1000 keys per call), or as many files of a local walk.
DETECT_PAGE = 1000
SKIPPED_EXAMPLES = 5


# --------------------------------------------------------------------------- names

def name_class(name: str, extensions: list[str] | tuple[str, ...] = ()) -> str:
    """What a file is by its name: ``image`` (one of ``extensions``), ``shard``
    (.tar/.tar.gz/.tgz), ``table`` (.parquet/.csv/.json/.jsonl/.ndjson), ``hidden`` (a
    basename starting with a dot) or ``other``."""
    base = posixpath.basename(name.rstrip("/"))
    if base.startswith("."):
        return HIDDEN
    low = base.lower()
    if "." in low and low.rsplit(".", 1)[1] in extensions:
        return IMAGE
    if low.endswith(TAR_SUFFIXES):
        return SHARD
    if posixpath.splitext(low)[1] in TABLE_SUFFIXES:
        return TABLE
    return OTHER


def is_image_name(name: str, extensions: list[str] | tuple[str, ...]) -> bool:
    return name_class(name, extensions) == IMAGE


def raw_name(name: str) -> bytes:
    """The bytes of a file name as the OS gave them (``os.fsencode``; a str that did not
    come from the OS: its UTF-8 with surrogates passed through)."""
    try:
        return os.fsencode(name)
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def printable_name(name: str) -> str:
    """``name`` as valid UTF-8 text: bytes that are not UTF-8 shown as ``\\xNN``."""
    return raw_name(name).decode("utf-8", "backslashreplace")


def skipped_extension(name: str) -> str:
    """The key a skipped file is counted under: its lower-case extension (``.tar.gz`` for
    shards), ``(hidden)`` for dot files, ``(none)`` without an extension."""
    base = posixpath.basename(name.rstrip("/"))
    if base.startswith("."):
        return "(hidden)"
    low = base.lower()
    tar = next((s for s in (".tar.gz", ".tgz", ".tar") if low.endswith(s)), None)
    ext = tar or posixpath.splitext(low)[1]
    return printable_name(ext) if ext else "(none)"


# --------------------------------------------------------------------------- skipped files

@dataclass
class Skipped:
    """Files a listing passed over because of their name: how many, per extension, and
    the first few (sorted) as examples. ``to_dict`` is the ``input_skipped`` of
    ``summary.json``."""

    count: int = 0
    by_extension: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, name: str) -> None:
        self.count += 1
        ext = skipped_extension(name)
        self.by_extension[ext] = self.by_extension.get(ext, 0) + 1
        shown = printable_name(name)
        if len(self.examples) < SKIPPED_EXAMPLES or shown < self.examples[-1]:
            self.examples = sorted({*self.examples, shown})[:SKIPPED_EXAMPLES]

    def merge(self, other: dict) -> None:
        """Add a report (``to_dict`` of another listing)."""
        self.count += int(other.get("count", 0))
        for ext, n in (other.get("by_extension") or {}).items():
            self.by_extension[ext] = self.by_extension.get(ext, 0) + int(n)
        self.examples = sorted({*self.examples, *(other.get("examples") or [])})[:SKIPPED_EXAMPLES]

    def to_dict(self) -> dict:
        return {"count": self.count, "by_extension": dict(sorted(self.by_extension.items())),
                "examples": list(self.examples)}


def write_skipped(folder: str, tag: str, skipped: Skipped, storage: StorageConfig) -> None:
    """Leave ``skipped`` in ``folder`` as one small JSON file named after ``tag`` (the
    listing task: rewriting it on a retry is harmless). Nothing when nothing was skipped."""
    if not skipped.count:
        return
    fs, path = filesystem(folder, storage)
    name = hashlib.blake2b(raw_name(tag), digest_size=12).hexdigest() + ".json"
    write_bytes_atomic(fs, join(path, name), json.dumps(skipped.to_dict(), sort_keys=True).encode())


def collect_skipped(folder: str, storage: StorageConfig) -> dict:
    """The sum of the reports :func:`write_skipped` left in ``folder``; removes them."""
    total = Skipped()
    fs, path = filesystem(folder, storage)
    if not fs.exists(path):
        return total.to_dict()
    files = sorted(p for p in fs.find(path) if p.endswith(".json"))
    for blob in (fs.cat(files).values() if files else ()):  # one concurrent fetch on S3
        total.merge(json.loads(blob))
    fs.rm(path, recursive=True)
    return total.to_dict()


# --------------------------------------------------------------------------- detection sample

def sample_names(root: str, storage: StorageConfig, limit: int = DETECT_PAGE) -> list[str]:
    """Up to ``limit`` file names (URIs) below ``root``, for kind detection, never the
    whole tree: on S3 one recursive ``list_objects_v2`` call; locally a depth-first walk
    that stops after ``limit`` files (or ``10 * limit`` entries); ``[root]`` for a file."""
    fs, path = filesystem(root, storage)
    if root.startswith(("s3://", "s3a://")):
        bucket, _, prefix = path.partition("/")
        prefix = prefix.rstrip("/") + "/" if prefix else ""
        page = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=limit)
        return [f"s3://{bucket}/{o['Key']}" for o in page.get("Contents", []) if not o["Key"].endswith("/")]
    if not is_remote(root):
        return _walk_local(path, limit)
    names: list[str] = []
    for _, _, files in fs.walk(path):  # other fsspec protocols: one listing per folder
        names += [to_uri(fs, f) for f in files]
        if len(names) >= limit:
            break
    return names[:limit] or [root]


def _walk_local(path: str, limit: int) -> list[str]:
    if not os.path.isdir(path):
        return [path]
    out: list[str] = []
    budget, stack = 10 * limit, [path]
    while stack and len(out) < limit and budget > 0:
        subdirs = []
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    budget -= 1
                    (subdirs if _is_dir(entry) else out).append(entry.path)
                    if len(out) >= limit or budget <= 0:
                        break
        except OSError:
            continue
        stack.extend(sorted(subdirs, reverse=True))  # depth first, in name order, like S3 keys
    return out


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# --------------------------------------------------------------------------- folder / prefix listing

# Boundaries of the key ranges a large flat S3 prefix is listed in, in parallel.
KEY_RANGE_BOUNDS = [chr(c) for c in (*range(ord("0"), ord("9") + 1), *range(ord("A"), ord("Z") + 1),
                                      *range(ord("a"), ord("z") + 1))]


def s3_key_ranges(root: str, storage: StorageConfig, page: int = 1000) -> list[str] | None:
    """For an S3 prefix with more than ``page`` entries directly under it, the listing
    tasks to run instead of one driver-side listing: ``s3://bucket/prefix/#range=lo,hi``
    covering keys in (prefix+lo, prefix+hi] (``lo``/``hi`` empty = open), disjoint and
    complete. None for a small prefix (list it level by level)."""
    fs, path = filesystem(root, storage)
    bucket, _, prefix = path.partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    first = fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, Delimiter="/", MaxKeys=page)
    if not first.get("IsTruncated"):
        return None
    bounds = ["", *KEY_RANGE_BOUNDS, ""]
    return [f"s3://{bucket}/{prefix}#range={lo},{hi}" for lo, hi in zip(bounds[:-1], bounds[1:])]


def list_key_range(task: str, storage: StorageConfig, extensions: list[str],
                   skipped: Skipped | None = None) -> Iterator[str]:
    """The image keys of one :func:`s3_key_ranges` task, recursively, page by page; the
    other keys are counted in ``skipped``."""
    base, _, spec = task.partition("#range=")
    lo, _, hi = spec.partition(",")
    fs, path = filesystem(base, storage)
    bucket, _, prefix = path.partition("/")
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if lo:
        kwargs["StartAfter"] = prefix + lo
    while True:
        page = fs.call_s3("list_objects_v2", **kwargs)
        for obj in page.get("Contents", []):
            key = obj["Key"]
            if hi and key > prefix + hi:
                return
            if is_image_name(key, extensions):
                yield f"s3://{bucket}/{key}"
            elif skipped is not None and not key.endswith("/"):
                skipped.add(f"s3://{bucket}/{key}")
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]
        kwargs.pop("StartAfter", None)


def split_listing(root: str, storage: StorageConfig, extensions: list[str],
                  skipped: Skipped | None = None) -> tuple[list[str], list[str]]:
    """One level of a folder/prefix: (image files at the top, listing tasks to run in
    parallel: sub-folders, or key ranges of a large flat S3 prefix). The other files at
    the top are counted in ``skipped``."""
    fs, path = filesystem(root, storage)
    if root.startswith(("s3://", "s3a://")):
        ranges = s3_key_ranges(root, storage)
        if ranges is not None:
            return [], ranges
    files, dirs = [], []
    for entry in fs.ls(path, detail=True):
        name = entry["name"]
        if entry.get("type") == "directory":
            dirs.append(to_uri(fs, name))
        elif is_image_name(name, extensions):
            files.append(to_uri(fs, name))
        elif skipped is not None and name.rstrip("/") != path and not name.endswith("/"):
            skipped.add(to_uri(fs, name))
    return sorted(files), sorted(dirs)


def list_prefix(root: str, storage: StorageConfig, extensions: list[str],
                skipped: Skipped | None = None) -> list[str]:
    """Every image file below ``root`` (recursive; one paginated listing), or in one key
    range of :func:`s3_key_ranges`; the other files are counted in ``skipped``."""
    if "#range=" in root:
        return list(list_key_range(root, storage, extensions, skipped))
    fs, path = filesystem(root, storage)
    return _pick(fs, fs.find(path), lambda p: is_image_name(p, extensions), skipped)


def list_shards(paths: list[str], storage: StorageConfig, skipped: Skipped | None = None) -> list[str]:
    """Shard files (URIs): the paths given, and the shards below folders among them (the
    other files there are counted in ``skipped``)."""
    out = []
    for p in paths:
        fs, path = filesystem(p, storage)
        if path.lower().endswith(TAR_SUFFIXES):
            out.append(to_uri(fs, path))
        else:
            out += _pick(fs, fs.find(path), lambda q: name_class(q) == SHARD, skipped)
    return sorted(out)


def list_tables(paths: list[str], storage: StorageConfig, suffixes: tuple[str, ...],
                skipped: Skipped | None = None) -> list[str]:
    """Table files (URIs) at or below ``paths``. Below a folder, hidden files are not
    tables (pyarrow datasets skip them too); they and the files without one of
    ``suffixes`` are counted in ``skipped``."""
    out = []
    for p in paths:
        fs, path = filesystem(p, storage)
        if fs.isdir(path):
            out += _pick(fs, fs.find(path),
                         lambda q: q.lower().endswith(suffixes) and name_class(q) != HIDDEN, skipped)
        else:
            out.append(to_uri(fs, path))
    return sorted(out)


def _pick(fs, names, wanted, skipped: Skipped | None) -> list[str]:
    """The URIs of ``names`` that are ``wanted``, sorted; the others go to ``skipped``."""
    out = []
    for n in sorted(names):
        if n.endswith("/"):  # an S3 "folder" marker object, not a file
            continue
        if wanted(n):
            out.append(to_uri(fs, n))
        elif skipped is not None:
            skipped.add(to_uri(fs, n))
    return out
