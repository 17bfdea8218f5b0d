"""Image cells of a parquet input found again by their rows' uris (thumbnails, export).

A row's uri is ``file.parquet#<key column>=<value>`` (the first row with that key in the
file) or, for a row whose key is null or repeats another row's, ``file.parquet#@G:R`` (row
``R`` of row group ``G``), so every row's uri names that row alone. Only the key column and
the image column of the row groups holding wanted rows are read, and a row group whose
image column the footer says is over ``rows x max_bytes`` is not read at all.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.config import StorageConfig
from manifests.io import filesystem
from manifests.schema import Reason

# Coordinates of a parquet row, kept from the metadata read to the image read.
PQ_FILE, PQ_GROUP, PQ_ROW = "_pq_file", "_pq_row_group", "_pq_row"


def coordinate_member(row_group: int, row: int) -> str:
    """The uri member naming row ``row`` of row group ``row_group``."""
    return f"@{row_group}:{row}"


def _places(pf, members: set[str]) -> dict[str, tuple[int, int]]:
    """member -> (row group, row) of the rows it names (first match of a key)."""
    places: dict[str, tuple[int, int]] = {}
    by_key: dict[str, list[str]] = {}
    for m in members:
        if m.startswith("@"):
            g, _, r = m[1:].partition(":")
            places[m] = (int(g), int(r))
        elif "=" in m:
            col, _, value = m.partition("=")
            by_key.setdefault(col, []).append(m)
    starts = np.cumsum([0] + [pf.metadata.row_group(i).num_rows for i in range(pf.metadata.num_row_groups)])
    for col, wanted in by_key.items():
        keys = pc.cast(pf.read(columns=[col]).column(0), pa.string())
        values = [m.partition("=")[2] for m in wanted]
        hits = np.flatnonzero(pc.is_in(keys, value_set=pa.array(values)).fill_null(False).to_numpy(zero_copy_only=False))
        for i in hits.tolist():
            m = f"{col}={keys[i].as_py()}"
            if m not in places:
                g = int(np.searchsorted(starts, i, side="right") - 1)
                places[m] = (g, i - int(starts[g]))
    return places


def read_parquet_members(uri: str, storage: StorageConfig, members: set[str], bytes_column: str,
                         max_bytes: int | None) -> dict[str, bytes | None]:
    """member -> its image bytes (None: not found, or over ``max_bytes``)."""
    import pyarrow.parquet as pq

    out: dict[str, bytes | None] = {m: None for m in members}
    fs, path = filesystem(uri, storage)
    with fs.open(path, "rb") as f:
        md = parquet_footer(f)
        pf = pq.ParquetFile(f, metadata=md, pre_buffer=False)
        places = _places(pf, members)
        by_group: dict[int, list[tuple[str, int]]] = {}
        for m, (g, r) in places.items():
            if 0 <= g < md.num_row_groups and 0 <= r < md.row_group(g).num_rows:
                by_group.setdefault(g, []).append((m, r))
        for g, rows in sorted(by_group.items()):
            if group_over_budget(md, g, bytes_column, max_bytes) is not None:
                continue
            column = pf.read_row_group(g, columns=[bytes_column]).column(0)
            cells, _ = checked_cells(column.take(pa.array([r for _, r in rows])), max_bytes)
            for (m, _), b in zip(rows, cells.to_pylist()):
                out[m] = b
    return out


# --------------------------------------------------------------------------- footers and cells

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


def checked_cells(blobs: pa.ChunkedArray | pa.Array, max_bytes: int | None) -> tuple[pa.ChunkedArray, list]:
    """(image cells as binary, those over ``max_bytes`` nulled; per cell None, ``missing``
    (null) or ``file_too_large`` with its size). Sizes come from ``pc.binary_length``: no
    cell is turned into a Python object here."""
    blobs = blobs.cast(pa.binary())
    lengths = pc.binary_length(blobs)
    rejects: list = [None if n is not None and (max_bytes is None or n <= max_bytes) else
                     (Reason.MISSING, "null image bytes") if n is None else
                     (Reason.FILE_TOO_LARGE, f"{n} bytes > max_bytes {max_bytes}") for n in lengths.to_pylist()]
    if max_bytes is not None and any(r is not None and r[0] == Reason.FILE_TOO_LARGE for r in rejects):
        blobs = pc.if_else(pc.greater(lengths, max_bytes), pa.scalar(None, pa.binary()), blobs)
    if isinstance(blobs, pa.Array):
        blobs = pa.chunked_array([blobs])
    return blobs, rejects


def group_over_budget(md, rg: int, column: str, max_bytes: int | None) -> str | None:
    """Why row group ``rg``'s ``column`` chunk may not be read (its footer size), or None."""
    if max_bytes is None:
        return None
    group = md.row_group(rg)
    size = column_chunk_bytes(group, column)
    if size > group.num_rows * max_bytes:
        return (f"row group {rg}: column {column!r} holds {size} bytes uncompressed for {group.num_rows} rows, "
                f"more than rows x max_bytes {max_bytes}: a cell is too large and the group is not read")
    return None


def column_chunk_bytes(group, column: str) -> int:
    """Uncompressed bytes of a top-level column (all its leaves) in one row group's footer."""
    return sum(group.column(j).total_uncompressed_size for j in range(group.num_columns)
               if group.column(j).path_in_schema.split(".", 1)[0] == column)
