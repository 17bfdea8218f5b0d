"""Filesystems, committed outputs and manifest reading (local or S3).

A finished dataset directory contains a ``_SUCCESS`` file written last. Locally, outputs
are written under a temporary name and renamed into place; on S3 (no atomic rename) old
markers are removed first and the marker is written after every data file. Readers call
:func:`is_committed` and refuse a directory without its marker.
"""

from __future__ import annotations

import json
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow.fs as pafs

from manifests.config import StorageConfig

SUCCESS = "_SUCCESS"


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage: StorageConfig | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``uri`` and the path inside it (no protocol)."""
    storage = storage or StorageConfig()
    if uri.startswith(("s3://", "s3a://")):
        import s3fs

        client_kwargs: dict[str, Any] = {}
        if storage.resolved_endpoint():
            client_kwargs["endpoint_url"] = storage.resolved_endpoint()
        if storage.region:
            client_kwargs["region_name"] = storage.region
        # botocore's own retries stay short (standard mode, 3 attempts): the policy that
        # outlasts an outage is ours (StorageConfig.max_retries, exponential backoff).
        config = {"retries": {"max_attempts": 3, "mode": "standard"}, "connect_timeout": 10, "read_timeout": 60}
        # No listings cache: a long-lived process (a notebook, a refresh loop) must see
        # objects added since its last listing.
        fs = s3fs.S3FileSystem(anon=storage.anon, client_kwargs=client_kwargs, config_kwargs=config,
                               skip_instance_cache=False, use_listings_cache=False)
        return fs, uri.split("://", 1)[1].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    if "://" in uri:
        fs, path = fsspec.core.url_to_fs(uri)
        return fs, path
    return fsspec.filesystem("file"), posixpath.abspath(uri)


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """A pyarrow filesystem for Ray Data. Local stays native; anything else wraps fsspec
    (pyarrow's own S3 filesystem ignores custom endpoints such as $AWS_ENDPOINT_URL)."""
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def join(fs_path: str, *parts: str) -> str:
    return posixpath.join(fs_path, *parts)


def to_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The user-facing URI of ``path`` on ``fs`` (s3://... or a local path)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "file" in protocols or "local" in protocols:
        return path
    return f"{protocols[0]}://{path}"


def is_committed(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    return fs.exists(join(path, SUCCESS))


def read_marker(fs: fsspec.AbstractFileSystem, path: str) -> dict | None:
    """The JSON stored in a committed directory's ``_SUCCESS`` (None if uncommitted)."""
    try:
        with fs.open(join(path, SUCCESS), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    return json.loads(raw or b"{}")


def read_run_summary(fs: fsspec.AbstractFileSystem, root: str, prog: str, output: str) -> dict:
    """A finished run's ``summary.json``; a one-line :class:`ValueError` naming ``prog`` when
    there is none (the reports turn it into their config error)."""
    try:
        with fs.open(join(root, "summary.json"), "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(f"{prog}: {output} has no summary.json (run the pipeline first)") from None


def temp_path(fs: fsspec.AbstractFileSystem, final: str) -> str:
    """Where to write ``final`` before committing it."""
    parent, name = posixpath.split(final.rstrip("/"))
    return join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


def uncommit(fs: fsspec.AbstractFileSystem, final: str) -> None:
    """Remove a previous output at ``final`` (marker first, so it never looks complete)."""
    marker = join(final, SUCCESS)
    if fs.exists(marker):
        fs.rm(marker)
    if fs.exists(final):
        fs.rm(final, recursive=True)


def commit(fs: fsspec.AbstractFileSystem, tmp: str, final: str, marker: dict | None = None) -> None:
    """Move ``tmp`` to ``final`` and write its ``_SUCCESS`` marker last."""
    uncommit(fs, final)
    if is_remote(to_uri(fs, final)):
        fs.copy(tmp, final, recursive=True)
        fs.rm(tmp, recursive=True)
    else:
        fs.mv(tmp, final, recursive=True)
    write_marker(fs, final, marker or {})


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write one file so that readers see all of it or nothing: on a local disk under a
    temporary name then renamed; on S3 one PUT (or a multipart upload) is atomic."""
    if is_remote(to_uri(fs, path)):
        with fs.open(path, "wb") as f:
            f.write(data)
        return
    parent, name = posixpath.split(path)
    fs.makedirs(parent, exist_ok=True)
    tmp = join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_table_atomic(fs: fsspec.AbstractFileSystem, path: str, table) -> None:
    """One parquet file, written whole (see :func:`write_bytes_atomic`)."""
    import io

    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes_atomic(fs, path, buf.getvalue())


def write_marker(fs: fsspec.AbstractFileSystem, path: str, marker: dict) -> None:
    fs.makedirs(path, exist_ok=True)
    with fs.open(join(path, SUCCESS), "wb") as f:
        f.write(json.dumps(marker, sort_keys=True).encode())


def read_committed_table(uri: str, storage: StorageConfig | None = None):
    """Read a committed parquet dataset (e.g. ``<run>/curated``) into one Arrow table.

    Raises ``FileNotFoundError`` if the directory has no ``_SUCCESS`` marker.
    """
    import pyarrow.dataset as ds

    fs, path = filesystem(uri, storage)
    if not is_committed(fs, path):
        raise FileNotFoundError(f"{uri} is not a committed output (no {SUCCESS})")
    files = sorted(p for p in fs.find(path) if p.endswith(".parquet"))
    if not files:
        import pyarrow as pa

        return pa.table({})
    return ds.dataset(files, format="parquet", filesystem=arrow_filesystem(fs)).to_table()
