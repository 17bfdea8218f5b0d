"""Ingest: turn an input (folder / S3 prefix, manifest table, parquet with bytes,
webdataset shards) into rows of ``id, uri, image_bytes`` plus metadata, never decoding.

Functions here are per-batch or per-shard and Ray-free; ``pipeline.plan`` maps them onto
Ray Data. A row that cannot be read becomes a reject (``stage=ingest``) with a reason;
transient storage errors are retried with exponential backoff first.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa

from manifests.io import filesystem
from manifests.schema import BYTES, ID, URI, Reason, Stage, check_columns
from pipeline.config import ConfigError, InputConfig, StorageConfig
from stages import listing
from stages.kernels.hashing import stable_id
from stages.listing import (  # noqa: F401 - the listing lives in stages.listing; re-exported for callers
    KEY_RANGE_BOUNDS, TABLE_SUFFIXES, TAR_SUFFIXES, Skipped, list_key_range, list_prefix, list_shards, list_tables,
    s3_key_ranges, split_listing,
)

KEY_CANDIDATES = ("uuid", "key", "id", "uri", "url")

_TRANSIENT_MARKERS = (
    "slowdown", "throttl", "internalerror", "serviceunavailable", "service unavailable",
    "requesttimeout", "timed out", "timeout", "connection", "503", "500 ", "502", "504",
    "toomanyrequests", "please reduce your request rate",
)


class TransientReadError(OSError):
    """A storage error that outlived its retries (raised only in 'fail' mode)."""


# --------------------------------------------------------------------------- rows

def reject_columns(n: int) -> dict[str, pa.Array]:
    return {k: pa.nulls(n, pa.string()) for k in ("stage", "reason", "detail")}


def with_reject_columns(table: pa.Table, rejects: list[tuple[Reason, str] | None]) -> pa.Table:
    """Set ``stage/reason/detail`` (stage ``ingest``) where ``rejects[i]`` is not None.

    Rows already rejected upstream keep their reject; others stay null (alive).
    """
    n = len(rejects)
    prior = {k: table.column(k).to_pylist() if k in table.column_names else [None] * n
             for k in ("stage", "reason", "detail")}
    cols = {
        "stage": [p or (Stage.INGEST.value if r else None) for p, r in zip(prior["stage"], rejects)],
        "reason": [p or (str(r[0]) if r else None) for p, r in zip(prior["reason"], rejects)],
        "detail": [p or (r[1] if r else None) for p, r in zip(prior["detail"], rejects)],
    }
    for k, v in cols.items():
        if k in table.column_names:
            table = table.drop_columns([k])
        table = table.append_column(k, pa.array(v, pa.string()))
    return table


# --------------------------------------------------------------------------- errors and retries

def classify_error(exc: BaseException) -> Reason | None:
    """The reject reason of a read failure, or None if it is transient (worth retrying)."""
    if isinstance(exc, FileNotFoundError):
        return Reason.MISSING
    if isinstance(exc, PermissionError):
        return Reason.PERMISSION_DENIED
    if isinstance(exc, (IsADirectoryError, NotADirectoryError)):
        return Reason.READ_ERROR
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return None
    text = f"{type(exc).__name__} {exc}".lower()
    if any(m in text for m in _TRANSIENT_MARKERS):
        return None
    return Reason.READ_ERROR


def read_with_retry(read, what: str, storage: StorageConfig) -> bytes | tuple[Reason, str]:
    """Call ``read()``; retry transient failures with backoff. Returns the bytes or
    ``(reason, detail)`` for a permanent failure."""
    delay = storage.retry_base_s
    for attempt in range(storage.max_retries + 1):
        try:
            return read()
        except Exception as e:  # noqa: BLE001 - classified below
            reason = classify_error(e)
            if reason is not None:
                return reason, f"{type(e).__name__}: {e}"[:500]
            if attempt == storage.max_retries:
                detail = f"transient error persisted after {storage.max_retries} retries: {type(e).__name__}: {e}"
                if storage.on_transient_exhausted == "reject":
                    return Reason.READ_ERROR, detail[:500]
                raise TransientReadError(f"{what}: {detail}") from e
            time.sleep(min(delay, 20.0))
            delay *= 2
    raise AssertionError("unreachable")


def fetch_object(uri: str, storage: StorageConfig) -> bytes | tuple[Reason, str]:
    try:
        fs, path = filesystem(uri, storage)
    except Exception as e:  # noqa: BLE001 - e.g. an unknown protocol in one manifest row
        return Reason.READ_ERROR, f"cannot open {uri!r}: {type(e).__name__}: {e}"[:500]
    return read_with_retry(lambda: fs.cat_file(path), uri, storage)


def fetch_batch(table: pa.Table, storage: StorageConfig, uri_column: str = URI) -> pa.Table:
    """Add ``image_bytes`` and reject columns, fetching the URIs of ``table`` concurrently."""
    uris = table.column(uri_column).to_pylist()
    prior = table.column("reason").to_pylist() if "reason" in table.column_names else [None] * len(uris)

    def one(i):
        if prior[i] is not None:
            return None  # rejected upstream (e.g. not in the catalog): nothing to read
        if not uris[i]:
            return Reason.MISSING, "empty uri"
        return fetch_object(str(uris[i]), storage)

    todo = range(len(uris))
    if len(uris) > 1 and storage.read_concurrency > 1:
        with ThreadPoolExecutor(max_workers=min(storage.read_concurrency, len(uris))) as pool:
            results = list(pool.map(one, todo))
    else:
        results = [one(i) for i in todo]
    blobs = [r if isinstance(r, bytes) else None for r in results]
    if BYTES in table.column_names:
        table = table.drop_columns([BYTES])
    table = table.append_column(BYTES, pa.array(blobs, pa.binary()))
    return with_reject_columns(table, [None if isinstance(r, bytes) else r for r in results])


# --------------------------------------------------------------------------- sources

def detect_kind(cfg: InputConfig, storage: StorageConfig) -> str:
    """The input layout: ``input.kind``, or for ``auto`` what the names say. A file path
    by its suffix; a folder/prefix by one page of its names (:func:`listing.sample_names`,
    never the whole tree): only shards -> webdataset, only tables -> parquet_bytes (the
    first parquet file holds ``input.bytes_column``) or manifest, otherwise folder. Images
    mixed with shards or tables (or shards with tables) raise a one-line ConfigError:
    reading one kind would silently drop the other."""
    if cfg.kind != "auto":
        return cfg.kind
    named: list[tuple[str, str]] = []  # (name, class)
    for p in cfg.paths():
        if p.lower().endswith((*TAR_SUFFIXES, *TABLE_SUFFIXES)):  # a file named explicitly: its suffix
            named.append((p, listing.SHARD if p.lower().endswith(TAR_SUFFIXES) else listing.TABLE))
        else:
            named += [(n, listing.name_class(n, cfg.extensions)) for n in listing.sample_names(p, storage)]
    classes = Counter(c for _, c in named)
    found = {c: classes[c] for c in (listing.IMAGE, listing.SHARD, listing.TABLE) if classes[c]}
    if len(found) > 1:
        what = {listing.IMAGE: "image files", listing.SHARD: "shards (.tar/.tar.gz/.tgz)",
                listing.TABLE: f"tables ({'/'.join(TABLE_SUFFIXES)})"}
        raise ConfigError(
            f"input.path {', '.join(cfg.paths())} mixes {' and '.join(f'{n} {what[c]}' for c, n in found.items())} "
            f"(in the first {len(named)} files): set input.kind to folder (reads the images only), webdataset "
            "(the shards only) or manifest/parquet_bytes (the tables only), or split the folder")
    if listing.SHARD in found:
        return "webdataset"
    if listing.TABLE in found:
        parquet = next((n for n, c in named if c == listing.TABLE and n.lower().endswith(".parquet")), None)
        return _table_kind(parquet, cfg, storage) if parquet else "manifest"
    return "folder"


def _table_kind(parquet_uri: str, cfg: InputConfig, storage: StorageConfig) -> str:
    """A parquet file holding the image column is parquet_bytes, else a manifest."""
    return "parquet_bytes" if cfg.bytes_column in table_columns(parquet_uri, storage) else "manifest"


def table_columns(path: str, storage: StorageConfig) -> list[str]:
    """Column names of one table file (parquet schema, CSV header, first JSONL record)."""
    fs, p = filesystem(path, storage)
    suffix = posixpath.splitext(p.lower())[1]
    with fs.open(p, "rb") as f:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_schema(f).names
        first = f.readline().decode("utf-8", errors="replace")
    if suffix == ".csv":
        import csv

        return next(csv.reader([first]), [])
    return list(json.loads(first or "{}"))


def check_source(cfg: InputConfig, storage: StorageConfig, kind: str) -> None:
    """Fail before the run on table inputs that lack the configured columns."""
    if kind == "manifest":
        files = list_tables(cfg.paths(), storage, tuple(TABLE_SUFFIXES))
        if not files:
            raise ValueError(f"input.path: no table files ({sorted(TABLE_SUFFIXES)}) in {cfg.paths()}")
        check_columns(table_columns(files[0], storage), {cfg.uri_column: "input.uri_column"})
    elif kind == "parquet_bytes":
        files = list_tables(cfg.paths(), storage, (".parquet",))
        if not files:
            raise ValueError(f"input.path: no .parquet files in {cfg.paths()}")
        names = table_columns(files[0], storage)
        check_columns(names, {cfg.bytes_column: "input.bytes_column"})
        resolve_key_column(names, cfg)


def uri_rows(uris: list[str]) -> pa.Table:
    """Rows ``id, uri`` (+ reject columns) of listed files. A local name that is not valid
    UTF-8 (Linux allows any bytes) cannot be a ``uri`` any reader of the manifest could
    open: its row is rejected ``unsafe_path``, its uri the name with ``\\xNN`` escapes and
    its id hashed from the raw bytes (``os.fsencode``), so it is still unique."""
    ids, shown, rejects = [], [], []
    for u in uris:
        try:
            u.encode("utf-8")
        except UnicodeEncodeError:
            text = listing.printable_name(u)
            ids.append(stable_id("\0fsencode:" + listing.raw_name(u).hex()))  # no path holds NUL: no clash
            shown.append(text)
            rejects.append((Reason.UNSAFE_PATH, f"file name is not valid UTF-8: {text!r}; rename it to UTF-8 "
                                                "(e.g. convmv -f latin1 -t utf8 --notest)"))
            continue
        ids.append(stable_id(u))
        shown.append(u)
        rejects.append(None)
    return with_reject_columns(pa.table({ID: pa.array(ids, pa.string()), URI: pa.array(shown, pa.string())}), rejects)


def resolve_key_column(names: list[str], cfg: InputConfig) -> str:
    if cfg.key_column:
        if cfg.key_column not in names:
            raise ValueError(f"input.key_column: column {cfg.key_column!r} not in {names}")
        return cfg.key_column
    for c in KEY_CANDIDATES:
        if c in names:
            return c
    raise ValueError(f"input.key_column: none of {list(KEY_CANDIDATES)} in {names}; set input.key_column")


def parquet_bytes_batch(table: pa.Table, bytes_column: str, key_column: str) -> pa.Table:
    """Rows of a parquet-with-bytes file -> ``id, uri, image_bytes`` + metadata."""
    keys = [None if k is None else str(k) for k in table.column(key_column).to_pylist()]
    paths = table.column("path").to_pylist() if "path" in table.column_names else [""] * len(keys)
    ids = [stable_id(f"{key_column}={k}") for k in keys]
    uris = [f"{p}#{key_column}={k}" for p, k in zip(paths, keys)]
    blobs = table.column(bytes_column)
    table = table.drop_columns([c for c in (bytes_column, "path", ID, URI) if c in table.column_names])
    table = table.append_column(ID, pa.array(ids, pa.string())).append_column(URI, pa.array(uris, pa.string()))
    table = table.append_column(BYTES, blobs.cast(pa.binary()))
    rejects = [None if b is not None else (Reason.MISSING, "null image bytes") for b in blobs.to_pylist()]
    return with_reject_columns(table, rejects)


# Coordinates of a parquet row, kept from the metadata read to the image read.
PQ_FILE, PQ_GROUP, PQ_ROW = "_pq_file", "_pq_row_group", "_pq_row"


def parquet_row_groups(batch: pa.Table, storage: StorageConfig) -> pa.Table:
    """``file`` rows -> one row per (file, row group) with its row count (footers only)."""
    out: dict[str, list] = {"file": [], "row_group": [], "rows": []}
    for uri in batch.column("file").to_pylist():
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            md = parquet_footer(f)
        for i in range(md.num_row_groups):
            out["file"].append(uri)
            out["row_group"].append(i)
            out["rows"].append(md.row_group(i).num_rows)
    return pa.table(out)


def parquet_metadata_rows(batch: pa.Table, storage: StorageConfig, bytes_column: str) -> pa.Table:
    """(file, row group) rows -> that row group's rows without the image column, plus their
    coordinates. Only the metadata columns' bytes are read."""
    import pyarrow.parquet as pq

    parts = []
    for uri, rg in zip(batch.column("file").to_pylist(), batch.column("row_group").to_pylist()):
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, metadata=parquet_footer(f), pre_buffer=False)
            t = pf.read_row_group(rg, columns=[n for n in pf.schema_arrow.names if n != bytes_column])
        n = len(t)
        parts.append(t.append_column(PQ_FILE, pa.array([uri] * n, pa.string()))
                      .append_column(PQ_GROUP, pa.array([rg] * n, pa.int32()))
                      .append_column(PQ_ROW, pa.array(range(n), pa.int32())))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})


def parquet_footer(f):
    """A parquet file's metadata, reading exactly its footer (pyarrow's own reader fetches
    the last 64 KiB, which for image files is mostly image data)."""
    import io
    import struct

    import pyarrow.parquet as pq

    f.seek(-8, 2)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise OSError("not a parquet file (no PAR1 footer magic)")
    (length,) = struct.unpack("<I", tail[:4])
    f.seek(-8 - length, 2)
    footer = f.read(length)
    return pq.read_metadata(io.BytesIO(b"PAR1" + footer + tail))


def parquet_selected_images(table: pa.Table, storage: StorageConfig, bytes_column: str, key_column: str) -> pa.Table:
    """Rows carrying parquet coordinates -> the same rows with their image bytes, reading
    the image column only of the row groups they fall in (rows of a row group are read
    together: keep them in one batch). Output as :func:`parquet_bytes_batch`."""
    import pyarrow.parquet as pq

    files = table.column(PQ_FILE).to_pylist()
    groups = table.column(PQ_GROUP).to_pylist()
    rows = table.column(PQ_ROW).to_pylist()
    blobs: list = [None] * len(table)
    prior = table.column("reason").to_pylist() if "reason" in table.column_names else [None] * len(table)
    by_group: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(files, groups)):
        if prior[i] is None:  # rows rejected upstream (not in the catalog) are not read
            by_group.setdefault(key, []).append(i)
    for (uri, rg), members in by_group.items():
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f, metadata=parquet_footer(f), pre_buffer=False)
            column = pf.read_row_group(rg, columns=[bytes_column]).column(0)
        taken = column.take(pa.array([rows[i] for i in members])).to_pylist()
        for i, b in zip(members, taken):
            blobs[i] = b
    paths = {u: filesystem(u, storage)[1] for u in set(files)}  # as Ray's include_paths gives them
    out = table.drop_columns([PQ_FILE, PQ_GROUP, PQ_ROW]).append_column(bytes_column, pa.array(blobs, pa.binary()))
    out = out.append_column("path", pa.array([paths[u] for u in files], pa.string()))
    return parquet_bytes_batch(out, bytes_column, key_column)


def manifest_rows(table: pa.Table, uri_column: str) -> pa.Table:
    """Rows of a manifest table -> ``id, uri`` + metadata (bytes fetched later)."""
    uris = [None if u is None else str(u) for u in table.column(uri_column).to_pylist()]
    ids = [stable_id(u or "") for u in uris]
    drop = sorted({c for c in (ID, URI, uri_column) if c in table.column_names})
    table = table.drop_columns(drop)
    return table.append_column(ID, pa.array(ids, pa.string())).append_column(URI, pa.array(uris, pa.string()))


# --------------------------------------------------------------------------- webdataset

@dataclass
class _Sample:
    key: str
    images: list[tuple[str, bytes]]
    sidecars: dict[str, str]
    rejects: list[tuple[str, Reason, str]]


def _member_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename; ext = the rest."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/"):
        return f"member name {name!r} escapes the archive"
    if member.issym() or member.islnk():
        return f"member {name!r} is a link to {member.linkname!r}"
    if not (member.isfile() or member.isdir()):
        return f"member {name!r} is not a regular file"
    return None


SKIPPED = "skipped_unselected"  # reason of a member not read because its key is unselected (never output)


def iter_shard(shard_uri: str, storage: StorageConfig, extensions: list[str], rows_per_block: int,
               keep: Callable[[str], bool] | None = None) -> Iterator[pa.Table]:
    """Stream one ``.tar``/``.tar.gz`` shard as tables of rows (never decoding images).

    Consecutive members sharing a key form a sample; each image member is a row carrying
    the sample's ``key`` and its other members as ``sidecars`` (JSON: ext -> text).
    Unsafe members and a broken stream become rejects; rows read before a break are kept.
    ``keep(basename of key)`` False: the image member is skipped unread (a row without
    bytes, reason ``SKIPPED``, which the catalog join drops or relabels).
    """
    rows: list[dict] = []

    def emit_sample(s: _Sample) -> None:
        side = json.dumps(s.sidecars, sort_keys=True) if s.sidecars else None
        for name, data in s.images:
            rows.append({ID: stable_id(f"{shard_uri}#{name}"), URI: f"{shard_uri}#{name}", "key": s.key,
                         "sidecars": side, BYTES: data, "_reject": None})
        for name, reason, detail in s.rejects:
            rows.append({ID: stable_id(f"{shard_uri}#{name}"), URI: f"{shard_uri}#{name}", "key": s.key,
                         "sidecars": None, BYTES: None, "_reject": (reason, detail)})
        if not s.images and not s.rejects:
            rows.append({ID: stable_id(f"{shard_uri}#{s.key}"), URI: f"{shard_uri}#{s.key}", "key": s.key,
                         "sidecars": side, BYTES: None,
                         "_reject": (Reason.MISSING, f"sample {s.key!r} has no image member ({sorted(s.sidecars)})")})

    def flush() -> Iterator[pa.Table]:
        if rows:
            yield _shard_table(rows)
            rows.clear()

    fs, path = filesystem(shard_uri, storage)
    current: _Sample | None = None
    n_members = 0
    try:
        with fs.open(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                n_members += 1
                problem = _unsafe(member)
                if member.isdir() and not problem:
                    continue
                key, ext = _member_key(member.name)
                if current is None or key != current.key:
                    if current is not None:
                        emit_sample(current)
                        if len(rows) >= rows_per_block:
                            yield from flush()
                    current = _Sample(key, [], {}, [])
                if problem:
                    current.rejects.append((member.name, Reason.UNSAFE_PATH, problem))
                    continue
                is_image = ext.rsplit(".", 1)[-1] in extensions
                if is_image and keep is not None and not keep(posixpath.basename(key)):
                    current.rejects.append((member.name, SKIPPED, "unselected"))  # data skipped by the stream
                    continue
                f = tar.extractfile(member)
                data = f.read() if f is not None else b""
                if is_image:
                    current.images.append((member.name, data))
                else:
                    current.sidecars[ext] = data.decode("utf-8", errors="replace")
            if current is not None:
                emit_sample(current)
                current = None
    except FileNotFoundError as e:
        rows.append(_shard_reject(shard_uri, "missing", Reason.MISSING, f"shard not found: {e}"))
    except PermissionError as e:
        rows.append(_shard_reject(shard_uri, "denied", Reason.PERMISSION_DENIED, str(e)))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if current is not None:
            emit_sample(current)  # members fully read before the break are kept
        rows.append(
            _shard_reject(shard_uri, f"broken@{n_members}", Reason.READ_ERROR,
                          f"archive stream broken after {n_members} members: {type(e).__name__}: {e}"[:500])
        )
    yield from flush()


def _shard_reject(shard_uri: str, tag: str, reason: Reason, detail: str) -> dict:
    return {ID: stable_id(f"{shard_uri}#<{tag}>"), URI: shard_uri, "key": None, "sidecars": None,
            BYTES: None, "_reject": (reason, detail)}


_SHARD_SCHEMA = pa.schema([(ID, pa.string()), (URI, pa.string()), ("key", pa.string()),
                           ("sidecars", pa.string()), (BYTES, pa.binary())])


def _shard_table(rows: list[dict]) -> pa.Table:
    t = pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in _SHARD_SCHEMA}, schema=_SHARD_SCHEMA)
    return with_reject_columns(t, [r["_reject"] for r in rows])
