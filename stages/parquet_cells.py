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

from manifests.io import filesystem
from manifests.config import StorageConfig


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

    from stages.ingest import _group_over_budget, checked_cells, parquet_footer

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
            if _group_over_budget(md, g, bytes_column, max_bytes) is not None:
                continue
            column = pf.read_row_group(g, columns=[bytes_column]).column(0)
            cells, _ = checked_cells(column.take(pa.array([r for _, r in rows])), max_bytes)
            for (m, _), b in zip(rows, cells.to_pylist()):
                out[m] = b
    return out
