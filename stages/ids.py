"""Unique ids per input row, and which table URIs may be read.

An input row's ``id`` is a hash of where it came from (a path, a URI, a key). A source can
name one place twice -- a manifest listing the same URI in two rows, a parquet file whose
key column repeats a value or is null -- and two rows with one id break "every input once"
(every later join by id would multiply them). :func:`unique_ids` gives every row of a
group sharing an id its own: the first keeps the plain id (a refresh still finds it), the
others get an ordinal, ``hash(base + NUL + n)`` (a NUL byte never occurs in a path, so an
ordinal id cannot collide with a real location's). The order inside a group is the
source order when the rows carry it (``order`` columns, e.g. a parquet row's file, row
group and row), else a hash of the row's content: rows with equal content are
interchangeable, so the output is the same however Ray split the input.

Ray-free; ``pipeline.plan`` brings every row of an id into one call by hash partition.
"""

from __future__ import annotations

import hashlib
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.rejects import reject_rows
from manifests.schema import ID, Reason, Stage
from stages.kernels.hashing import stable_id

ID_BASE = "_id_base"  # the string a row's id was hashed from
ID_PART = "_id_part"  # hash partition of the id (every row of an id in one partition)
REPEAT = "_id_repeat"  # ordinal of a row whose source repeats a name (null: the first)

# Protocols a table's ``uri`` may use besides local paths (and file://).
BUILTIN_PROTOCOLS = ("s3", "s3a")


def id_partition(table: pa.Table, parts: int, column: str = ID, hashed: bool = True) -> pa.Table:
    """Add ``_id_part``: a partition number that is a function of ``column``'s value alone
    (``hashed``: the value is already a hex hash, such as an id; else it is hashed here)."""
    if hashed:
        heads = pc.utf8_slice_codeunits(table[column], 0, 8).to_pylist()
        values = [0 if h is None else int(h, 16) % parts for h in heads]
    else:
        values = [0 if v is None else int(stable_id(str(v))[:8], 16) % parts for v in table[column].to_pylist()]
    return table.append_column(ID_PART, pa.array(values, pa.int32()))


def content_digests(table: pa.Table, rows: np.ndarray) -> list[bytes]:
    """A hash of each row's content (every column but the internal ones), in ``rows``."""
    columns = [c for c in table.column_names if not c.startswith("_") or c == ID_BASE]
    sub = table.select(columns).take(pa.array(rows, pa.int64())).to_pylist()
    return [hashlib.blake2b(repr(sorted(r.items())).encode("utf-8", "backslashreplace"), digest_size=16).digest()
            for r in sub]


def unique_ids(table: pa.Table, order: tuple[str, ...] = (), column: str = ID) -> pa.Table:
    """Make the id (``column``) unique in ``table``, which must hold every row of each id it
    contains.

    Columns: the id, ``_id_base`` (what the id was hashed from), optional ``order``
    columns (the source position). Adds ``_id_repeat`` (int32: 2, 3, ... on the rows that
    got an ordinal id, null elsewhere) and drops ``_id_part`` if present."""
    table = table.drop_columns([c for c in (ID_PART, REPEAT) if c in table.column_names])
    repeat = np.zeros(len(table), dtype=np.int32)
    counted = pc.value_counts(table[column])  # one vectorized pass; repeats are rare
    repeated = counted.field("values").filter(pc.greater(counted.field("counts"), 1))
    if len(repeated):
        dup_rows = np.flatnonzero(pc.is_in(table[column], value_set=repeated).to_numpy(zero_copy_only=False))
        ids = table[column].to_pylist()
        bases = table[ID_BASE].to_pylist()
        positions = [table[c].to_pylist() for c in order]
        groups: dict[str, list] = {}
        for i, digest in zip(dup_rows.tolist(), content_digests(table, dup_rows)):
            where = tuple((p[i] is not None, p[i]) for p in positions)
            groups.setdefault(ids[i], []).append((where, digest, i))
        for members in groups.values():
            for n, (_, _, i) in enumerate(sorted(members)[1:], start=2):
                ids[i] = stable_id(f"{bases[i]}\x00{n}")
                repeat[i] = n
        table = table.set_column(table.column_names.index(column), column, pa.array(ids, pa.string()))
    return table.append_column(REPEAT, pa.array([int(r) if r else None for r in repeat], pa.int32()))


def uri_protocol(uri: str) -> str | None:
    """The protocol of ``uri`` (lower case), None for a local path or ``file://``."""
    if "://" not in uri:
        return None
    scheme = uri.split("://", 1)[0].lower()
    return None if scheme in ("file", "local") else scheme


def unsupported_uri(uri: str, allowed: tuple[str, ...] | list[str]) -> str | None:
    """Why a table's ``uri`` may not be read (None when it may): local paths, ``file://``,
    ``s3://`` and the protocols in ``allowed`` are read; anything else (``http://`` to a
    metadata service, ``ftp://``, fsspec chains such as ``zip::``...) is not."""
    if "::" in uri:
        return f"uri {uri[:200]!r} chains fsspec protocols; only local paths and s3:// are read"
    proto = uri_protocol(uri)
    if proto is None or proto in BUILTIN_PROTOCOLS or proto in {a.lower() for a in allowed}:
        return None
    return (f"uri {uri[:200]!r} uses protocol {proto!r}: only local paths, s3:// and storage.allowed_protocols "
            f"{sorted(allowed)} are read")


def protocol_rejects(uris: list[str | None], allowed: tuple[str, ...] | list[str]) -> list[tuple[Reason, str] | None]:
    """Per uri: ``(Reason.UNSUPPORTED_URI, detail)`` or None. Vectorized: only the uris that
    are neither plain paths nor s3:// are looked at one by one."""
    out: list[tuple[Reason, str] | None] = [None] * len(uris)
    arr = pa.array(uris, pa.string())
    lowered = pc.utf8_lower(arr)
    plain = pc.invert(pc.or_(pc.match_substring(arr, "://"), pc.match_substring(arr, "::")))
    for proto in (*BUILTIN_PROTOCOLS, "file", *(a.lower() for a in allowed)):
        plain = pc.or_(plain, pc.starts_with(lowered, f"{proto}://"))
    plain = pc.and_(plain, pc.invert(pc.match_substring(arr, "::")))  # a chain is always looked at
    look = np.flatnonzero(~np.asarray(plain.fill_null(True).to_numpy(zero_copy_only=False), dtype=bool))
    for i in look.tolist():
        why = unsupported_uri(uris[i], allowed)
        out[i] = (Reason.UNSUPPORTED_URI, why) if why else None
    return out


ROW_ID = "_row_id"  # a parquet row's id, computed from its metadata before its image is read


def parquet_row_ids(table: pa.Table, key_column: str, coordinates: tuple[str, str, str]) -> pa.Table:
    """Add ``_row_id`` and ``_id_base`` to parquet metadata rows: ``hash(key=value)`` as
    always (a refresh finds the same id); a null key gets the row's place in its file
    instead (``file``, row group, row: ``coordinates`` names those columns), so null keys
    and a literal key "None" never share an id. (``_row_id``, not ``id``: the key column
    may itself be called ``id``; ``stages.ingest.parquet_bytes_batch`` makes it the id.)"""
    keys = table[key_column].to_pylist()
    files, groups, rows = (table[c].to_pylist() for c in coordinates)
    bases = [f"{key_column}={k}" if k is not None else f"{key_column}\x00null\x00{f}\x00{g}\x00{r}"
             for k, f, g, r in zip(keys, files, groups, rows)]
    table = table.drop_columns([c for c in (ROW_ID, ID_BASE) if c in table.column_names])
    return (table.append_column(ROW_ID, pa.array([stable_id(b) for b in bases], pa.string()))
            .append_column(ID_BASE, pa.array(bases, pa.string())))


def with_protocol_rejects(table: pa.Table, allowed: tuple[str, ...] | list[str], column: str = "uri") -> pa.Table:
    """``table`` with reject columns: ``unsupported_uri`` where ``column``'s protocol may
    not be read (rows already rejected keep their reject)."""
    return reject_rows(table, Stage.INGEST, protocol_rejects(table[column].to_pylist(), allowed))
