"""Ingest: turn an input (folder / S3 prefix, manifest table, parquet with bytes,
webdataset shards) into rows of ``id, uri, image_bytes`` plus metadata, never decoding.

Functions here are per-batch or per-shard and Ray-free; ``pipeline.plan`` maps them onto
Ray Data. A row that cannot be read becomes a reject (``stage=ingest``) with a reason;
transient storage errors are retried with exponential backoff first.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa

from manifests.config import ConfigError, InputConfig, StorageConfig, ValidateConfig
from manifests.io import filesystem
from manifests.rejects import alive, reject_rows
from manifests.schema import BYTES, ID, URI, Reason, Stage, check_columns
from stages import ids as row_ids
from stages import listing, shards
from stages.kernels.hashing import stable_id
from stages.parquet_cells import (
    PQ_FILE, PQ_GROUP, PQ_ROW, checked_cells, column_chunk_bytes, coordinate_member, group_over_budget, parquet_footer,
)
from stages.reads import read_at_most, read_with_retry, too_large_detail
from stages.listing import (  # noqa: F401 - the listing lives in stages.listing; re-exported for callers
    KEY_RANGE_BOUNDS, TABLE_SUFFIXES, TAR_SUFFIXES, Skipped, list_key_range, list_prefix, list_shards, list_tables,
    s3_key_ranges, split_listing,
)

KEY_CANDIDATES = ("uuid", "key", "id", "uri", "url")


# --------------------------------------------------------------------------- reads

def fetch_object(uri: str, storage: StorageConfig, max_bytes: int | None = None) -> bytes | tuple[Reason, str]:
    """An object's bytes, or ``(reason, detail)``; with ``max_bytes``, at most that many are
    kept and a larger object is ``file_too_large`` after reading ``max_bytes + 1``."""
    why = row_ids.unsupported_uri(uri, storage.allowed_protocols)  # defence in depth: tables are checked on reading
    if why:
        return Reason.UNSUPPORTED_URI, why
    try:
        fs, path = filesystem(uri, storage)
    except Exception as e:  # noqa: BLE001 - e.g. an unknown protocol in one manifest row
        return Reason.READ_ERROR, f"cannot open {uri!r}: {type(e).__name__}: {e}"[:500]
    got = read_with_retry(lambda: read_at_most(fs, path, max_bytes), uri, storage)
    if isinstance(got, bytes) and max_bytes is not None and len(got) > max_bytes:
        return Reason.FILE_TOO_LARGE, too_large_detail(fs, path, max_bytes)
    return got


def fetch_batch(table: pa.Table, storage: StorageConfig, uri_column: str = URI,
                max_bytes: int | None = None) -> pa.Table:
    """Add ``image_bytes`` and reject columns, fetching the URIs of ``table`` concurrently;
    an object over ``max_bytes`` (``validate.max_bytes``) is not read whole:
    ``file_too_large``."""
    uris = table.column(uri_column).to_pylist()
    live = alive(table)

    def one(i):
        if not live[i]:
            return None  # rejected upstream (e.g. not in the catalog): nothing to read
        if not uris[i]:
            return Reason.MISSING, "empty uri"
        return fetch_object(str(uris[i]), storage, max_bytes)

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
    return reject_rows(table, Stage.INGEST, [None if isinstance(r, bytes) else r for r in results])


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
    return reject_rows(pa.table({ID: pa.array(ids, pa.string()), URI: pa.array(shown, pa.string())}), Stage.INGEST, rejects)


def resolve_key_column(names: list[str], cfg: InputConfig) -> str:
    if cfg.key_column:
        if cfg.key_column not in names:
            raise ValueError(f"input.key_column: column {cfg.key_column!r} not in {names}")
        return cfg.key_column
    for c in KEY_CANDIDATES:
        if c in names:
            return c
    raise ValueError(f"input.key_column: none of {list(KEY_CANDIDATES)} in {names}; set input.key_column")


def parquet_bytes_batch(table: pa.Table, bytes_column: str, key_column: str, max_bytes: int | None = None) -> pa.Table:
    """Rows of a parquet-with-bytes file -> ``id, uri, image_bytes`` + metadata; a cell
    over ``max_bytes`` is dropped and the row rejected ``file_too_large``."""
    keys = [None if k is None else str(k) for k in table.column(key_column).to_pylist()]
    paths = table.column("path").to_pylist() if "path" in table.column_names else [""] * len(keys)
    # ids made unique from the metadata rows (stages.ids.parquet_row_ids), else hash(key=value)
    ids = (table.column("_row_id").to_pylist() if "_row_id" in table.column_names
           else [stable_id(f"{key_column}={k}") for k in keys])
    uris = [f"{p}#{key_column}={k}" for p, k in zip(paths, keys)]
    if "_uri" in table.column_names:  # rows a key cannot name alone: their place in the file
        uris = [c or u for c, u in zip(table.column("_uri").to_pylist(), uris)]
    blobs, rejects = checked_cells(table.column(bytes_column), max_bytes)
    table = table.drop_columns([c for c in (bytes_column, "path", ID, URI, "_row_id", "_uri")
                                if c in table.column_names])
    table = table.append_column(ID, pa.array(ids, pa.string())).append_column(URI, pa.array(uris, pa.string()))
    table = table.append_column(BYTES, blobs)
    return reject_rows(table, Stage.INGEST, rejects)


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


def parquet_metadata_rows(batch: pa.Table, storage: StorageConfig, bytes_column: str,
                          max_cell_bytes: int | None = InputConfig.model_fields["max_sidecar_bytes"].default
                          ) -> pa.Table:
    """(file, row group) rows -> that row group's rows without the image column, plus their
    coordinates. Only the metadata columns' bytes are read: a metadata column whose chunk
    the footer says is over ``rows x max_cell_bytes`` (``input.max_sidecar_bytes``) is not
    read (nulls) and the group's rows are rejected ``file_too_large``."""
    import pyarrow.parquet as pq

    parts = []
    for uri, rg in zip(batch.column("file").to_pylist(), batch.column("row_group").to_pylist()):
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            md = parquet_footer(f)
            pf = pq.ParquetFile(f, metadata=md, pre_buffer=False)
            names = [n for n in pf.schema_arrow.names if n != bytes_column]
            rows = md.row_group(rg).num_rows
            over = {c: column_chunk_bytes(md.row_group(rg), c) for c in names} if max_cell_bytes is not None else {}
            over = {c: b for c, b in over.items() if b > rows * max_cell_bytes}
            t = pf.read_row_group(rg, columns=[c for c in names if c not in over])
        if over:
            for c in over:
                t = t.append_column(pf.schema_arrow.field(c), pa.nulls(len(t), pf.schema_arrow.field(c).type))
            detail = (f"row group {rg}: metadata column(s) {sorted(over)} hold {sorted(over.values())} bytes for "
                      f"{rows} rows, more than rows x input.max_sidecar_bytes {max_cell_bytes}; not read")
            t = reject_rows(t, Stage.INGEST, [(Reason.FILE_TOO_LARGE, detail)] * len(t))
        n = len(t)
        parts.append(t.append_column(PQ_FILE, pa.array([uri] * n, pa.string()))
                      .append_column(PQ_GROUP, pa.array([rg] * n, pa.int32()))
                      .append_column(PQ_ROW, pa.array(range(n), pa.int32())))
    return pa.concat_tables(parts, promote_options="default") if parts else pa.table({})


def parquet_selected_images(table: pa.Table, storage: StorageConfig, bytes_column: str, key_column: str,
                            max_bytes: int | None = ValidateConfig.model_fields["max_bytes"].default) -> pa.Table:
    """Rows carrying parquet coordinates -> the same rows with their image bytes, reading
    the image column only of the row groups they fall in (rows of a row group are read
    together: keep them in one batch). Output as :func:`parquet_bytes_batch`.

    Sizes are checked before bytes are used: a row group whose image column the footer says
    is larger than ``rows x max_bytes`` uncompressed holds a cell over ``max_bytes`` that
    cannot be told from the others without inflating it, so it is not read (its selected
    rows are ``file_too_large``, the detail says why); a cell over ``max_bytes`` in a group
    that is read is dropped (``pc.binary_length``) before any conversion."""
    import pyarrow.parquet as pq

    files = table.column(PQ_FILE).to_pylist()
    groups = table.column(PQ_GROUP).to_pylist()
    rows = table.column(PQ_ROW).to_pylist()
    blobs: list = [None] * len(table)
    live = alive(table)
    by_group: dict[tuple[str, int], list[int]] = {}
    for i, key in enumerate(zip(files, groups)):
        if live[i]:  # rows rejected upstream (not in the catalog) are not read
            by_group.setdefault(key, []).append(i)
    size_rejects: list = [None] * len(table)
    for (uri, rg), members in by_group.items():
        fs, path = filesystem(uri, storage)
        with fs.open(path, "rb") as f:
            md = parquet_footer(f)
            over = group_over_budget(md, rg, bytes_column, max_bytes)
            if over is None:
                pf = pq.ParquetFile(f, metadata=md, pre_buffer=False)
                column = pf.read_row_group(rg, columns=[bytes_column]).column(0)
        if over is not None:
            for i in members:
                size_rejects[i] = (Reason.FILE_TOO_LARGE, over)
            continue
        taken, checked = checked_cells(column.take(pa.array([rows[i] for i in members])), max_bytes)
        for i, b, r in zip(members, taken.to_pylist(), checked):
            blobs[i] = b
            size_rejects[i] = r if r is not None and r[0] == Reason.FILE_TOO_LARGE else None
    paths = {u: filesystem(u, storage)[1] for u in set(files)}  # as Ray's include_paths gives them
    out = table.drop_columns([PQ_FILE, PQ_GROUP, PQ_ROW]).append_column(bytes_column, pa.array(blobs, pa.binary()))
    out = out.append_column("path", pa.array([paths[u] for u in files], pa.string()))
    out = out.append_column("_uri", pa.array(_coordinate_uris(table, key_column, [paths[u] for u in files]),
                                             pa.string()))
    if any(size_rejects):
        out = reject_rows(out, Stage.INGEST, size_rejects)
    return parquet_bytes_batch(out, bytes_column, key_column)


def _coordinate_uris(table: pa.Table, key_column: str, paths: list[str]) -> list[str | None]:
    """``path#@G:R`` for rows whose key is null or repeats another row's (``_id_repeat``
    from ``stages.ids.unique_ids``): a uri that names that row alone; None for the others."""
    keys = table.column(key_column).to_pylist()
    repeats = table.column("_id_repeat").to_pylist() if "_id_repeat" in table.column_names else [None] * len(keys)
    groups, rows = table.column(PQ_GROUP).to_pylist(), table.column(PQ_ROW).to_pylist()
    return [f"{p}#{coordinate_member(g, r)}" if k is None or n is not None else None
            for p, k, n, g, r in zip(paths, keys, repeats, groups, rows)]


def manifest_rows(table: pa.Table, uri_column: str, allowed_protocols: tuple[str, ...] | list[str] = ()) -> pa.Table:
    """Rows of a manifest table -> ``id, uri`` + metadata (bytes fetched later), and
    ``_id_base`` (a uri listed twice gets unique ids later: ``stages.ids.unique_ids``).
    A uri whose protocol may not be read (``stages.ids.unsupported_uri``) is rejected
    ``unsupported_uri`` here, before any worker reaches for it."""
    uris = [None if u is None else str(u) for u in table.column(uri_column).to_pylist()]
    bases = [u or "" for u in uris]
    drop = sorted({c for c in (ID, URI, row_ids.ID_BASE, uri_column) if c in table.column_names})
    table = table.drop_columns(drop)
    table = (table.append_column(ID, pa.array([stable_id(b) for b in bases], pa.string()))
             .append_column(URI, pa.array(uris, pa.string()))
             .append_column(row_ids.ID_BASE, pa.array(bases, pa.string())))
    return row_ids.with_protocol_rejects(table, allowed_protocols)


# --------------------------------------------------------------------------- webdataset

def iter_shard(shard_uri: str, storage: StorageConfig, extensions: list[str], rows_per_block: int,
               keep: Callable[[str], bool] | None = None, limits=None) -> Iterator[pa.Table]:
    """Stream one ``.tar``/``.tar.gz`` shard as tables of rows: :func:`stages.shards.iter_shard`."""
    return shards.iter_shard(shard_uri, storage, extensions, rows_per_block, keep, limits)
