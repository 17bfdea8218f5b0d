"""Webdataset shards: stream one ``.tar`` / ``.tar.gz`` into rows, trusting nothing in it.

Rows. Consecutive members sharing a key (the path up to the first dot of the basename)
form a sample; each image member is a row carrying the sample's ``key`` and its other
members as ``sidecars`` (JSON: ext -> text). Unsafe members, oversized members and a
broken stream become rejects (``stage=ingest``); rows read before a break are kept.

Names. A row's id is a hash of the raw bytes of ``shard#member`` (a name that is not
UTF-8 keeps its own bytes, as ``os.fsencode`` gives them); its ``uri`` shows bytes that are
not UTF-8 as ``\\xNN``. A shard can hold one name twice: the first occurrence keeps the
plain id and uri (a refresh finds it again), the n-th gets ``hash(location + NUL + n)``
(as ``stages.ids``) and the uri ``shard#member#n``. :func:`read_members` finds members again
by that uri (thumbnails, export).

Bounded reads. Sizes are checked from the tar header before a member is read: an image
over ``max_bytes`` or a sample's sidecars over ``max_sidecar_bytes`` are never extracted
(``file_too_large``, size in the detail). A member that is not read is still read through
by the stream; in a compressed shard that costs its decompressed size, so a member
declaring more than ``max_skip_bytes`` stops the shard (a shard-level reject says the
members after it were not reached). Headers between two members (pax, GNU long names)
may not hold more than :data:`HEADER_BYTES`. Decompression is done here, in bounded
chunks, so tarfile never sees more than those budgets.

Errors. A transient error (throttling, reset, timeout: ``reads.classify_error``)
part-way through reopens the shard and skips the members already emitted, with the
backoff of objects (``storage.max_retries``, ``retry_base_s``; the count restarts when
an attempt got further than the last). When retries run out: ``fail`` raises
``TransientReadError``; ``reject`` records a shard-level ``read_error`` saying how many
members were read and that the rest were not reached.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import posixpath
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pyarrow as pa

from manifests.io import filesystem
from manifests.rejects import reject_rows
from manifests.schema import BYTES, ID, URI, Reason, Stage
from manifests.config import InputConfig, StorageConfig, ValidateConfig
from stages.reads import TransientReadError, classify_error, retry_delay
from stages.listing import printable_name, raw_name

SKIPPED = "skipped_unselected"  # reason of a member not read because its key is unselected (never output)
# Bytes tarfile may read between two members beyond the first one's data: pax headers and
# GNU long names are a few hundred bytes; tarfile reads 10 KiB at a time.
HEADER_BYTES = 1 << 20
# tarfile's read size (its default, 10 KiB, costs ~1.5x the time to skip a member).
READ_CHUNK = 64 << 10
# A block of rows is emitted once it holds this many image bytes (Ray Data's default
# target_max_block_size), whatever input.rows_per_block says.
BLOCK_BYTES = 128 << 20
# Image bytes one sample (members sharing a key) may hold: its rows are emitted only when
# the key changes, so a shard of many images under one key would otherwise be held whole.
SAMPLE_BYTES = 128 << 20


@dataclass(frozen=True)
class ReadLimits:
    """What one shard read may cost (defaults: the config's)."""

    max_bytes: int = ValidateConfig.model_fields["max_bytes"].default
    max_sidecar_bytes: int = InputConfig.model_fields["max_sidecar_bytes"].default
    max_skip_bytes: int = InputConfig.model_fields["max_skip_bytes"].default

    @classmethod
    def of(cls, cfg) -> "ReadLimits":
        """The limits of a ``PipelineConfig``."""
        return cls(cfg.validate_.max_bytes, cfg.input.max_sidecar_bytes, cfg.input.max_skip_bytes)


# --------------------------------------------------------------------------- names

def member_ref(name: str, ordinal: int = 1) -> str:
    """What follows ``shard#`` in the uri of the ``ordinal``-th member called ``name``."""
    ref = printable_name(name)
    return ref if ordinal == 1 else f"{ref}#{ordinal}"


def location_id(location: str, ordinal: int = 1) -> str:
    """The id of the ``ordinal``-th row at ``location`` (``shard#member``): a hash of its
    raw bytes, equal to ``stable_id(location)`` for a UTF-8 name and the first occurrence."""
    raw = raw_name(location) + (b"\x00%d" % ordinal if ordinal > 1 else b"")
    return hashlib.blake2b(raw, digest_size=16).hexdigest()


def _member_key(name: str) -> tuple[str, str]:
    """webdataset convention: key = path up to the first dot of the basename; ext = the rest."""
    d, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(d, stem), ext.lower()


def _unsafe(member: tarfile.TarInfo) -> str | None:
    name = member.name
    shown = printable_name(name)
    if name.startswith("/") or name.startswith("\\") or ".." in name.replace("\\", "/").split("/"):
        return f"member name {shown!r} escapes the archive"
    if member.issym() or member.islnk():
        return f"member {shown!r} is a link to {printable_name(member.linkname)!r}"
    if not (member.isfile() or member.isdir()):
        return f"member {shown!r} is not a regular file"
    return None


# --------------------------------------------------------------------------- bounded stream

class _OverBudget(Exception):
    """tarfile read more between two members than their sizes allow (huge headers)."""


class _Budget(io.RawIOBase):
    """The decompressed shard as tarfile reads it, failing once more than the allowed bytes
    were read since :meth:`allow` was last called."""

    def __init__(self, inner):
        self.inner, self.left = inner, HEADER_BYTES

    def readable(self) -> bool:
        return True

    def allow(self, n: int) -> None:
        self.left = n

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n if n is not None and n >= 0 else 1 << 16)
        self.left -= len(data)
        if self.left < 0:
            raise _OverBudget(f"more than {HEADER_BYTES} bytes of tar headers between two members")
        return data


def _decompressed(raw) -> tuple[object, bool]:
    """(a file object of the decompressed bytes of ``raw``, whether it was compressed)."""
    head = raw.read(6)
    raw.seek(0)
    if head.startswith(b"\x1f\x8b"):
        return gzip.GzipFile(fileobj=raw, mode="rb"), True
    if head.startswith(b"BZh"):
        return bz2.BZ2File(raw), True
    if head.startswith((b"\xfd7zXZ", b"\x5d\x00\x00")):
        return lzma.LZMAFile(raw), True
    return raw, False


def _blocks(n: int) -> int:
    return -(-n // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


class _TooBigToSkip(Exception):
    def __init__(self, member: tarfile.TarInfo, ordinal: int, limit: int):
        super().__init__(member.name)
        self.member, self.ordinal, self.limit = member, ordinal, limit


@dataclass
class _Members:
    """The members of an open shard, one at a time, each with its ordinal (n-th of its name)."""

    tar: tarfile.TarFile
    budget: _Budget
    compressed: bool
    limits: ReadLimits
    names: Counter = field(default_factory=Counter)

    def __iter__(self) -> Iterator[tuple[tarfile.TarInfo, int]]:
        while (member := self.tar.next()) is not None:
            self.tar.members.clear()  # stream mode keeps every TarInfo otherwise
            self.names[member.name] += 1
            if self.compressed and member.size > self.limits.max_skip_bytes:
                raise _TooBigToSkip(member, self.names[member.name], self.limits.max_skip_bytes)
            self.budget.allow(_blocks(member.size) + HEADER_BYTES)
            yield member, self.names[member.name]

    def extract(self, member: tarfile.TarInfo) -> bytes:
        f = self.tar.extractfile(member)
        return f.read() if f is not None else b""


@contextmanager
def _open_members(fs, path: str, limits: ReadLimits) -> Iterator[_Members]:
    with fs.open(path, "rb") as raw:
        stream, compressed = _decompressed(raw)
        budget = _Budget(stream)
        with tarfile.open(fileobj=budget, mode="r|", bufsize=READ_CHUNK) as tar:
            yield _Members(tar, budget, compressed, limits)


def read_members(shard_uri: str, storage: StorageConfig, refs: set[str], max_bytes: int | None = None,
                 limits: ReadLimits | None = None) -> dict[str, bytes]:
    """ref (:func:`member_ref`, what a row's uri holds after ``shard#``) -> bytes, for the
    regular members of ``refs`` not over ``max_bytes``; one pass, stopping once all are found."""
    limits = limits or ReadLimits()
    max_bytes = limits.max_bytes if max_bytes is None else max_bytes
    out: dict[str, bytes] = {}
    fs, path = filesystem(shard_uri, storage)
    with _open_members(fs, path, limits) as members:
        for member, ordinal in members:
            ref = member_ref(member.name, ordinal)
            if ref in refs and member.isfile() and member.size <= max_bytes:
                out[ref] = members.extract(member)
                if len(out) == len(refs):
                    break
    return out


# --------------------------------------------------------------------------- rows

@dataclass
class _Sample:
    key: str
    images: list[tuple[str, int, bytes]] = field(default_factory=list)
    sidecars: dict[str, str] = field(default_factory=dict)
    sidecar_bytes: int = 0
    image_bytes: int = 0  # held until the sample ends: capped by SAMPLE_BYTES
    rejects: list[tuple[str, int, Reason | str, str]] = field(default_factory=list)
    spoiled: tuple[Reason, str] | None = None  # a reject for all its image rows (a sidecar too large, cut off)


class _ShardReader:
    """The state of one shard's rows across the attempts to read it."""

    def __init__(self, shard_uri: str, extensions: list[str], keep: Callable[[str], bool] | None,
                 limits: ReadLimits):
        self.uri, self.extensions, self.keep, self.limits = shard_uri, extensions, keep, limits
        self.rows: list[dict] = []
        self.row_bytes = 0
        self.claimed: set[str] = set()
        self.current: _Sample | None = None
        self.resume_at = 0  # members before this index were emitted (skipped on a reopen)
        self.failed_at = -1  # resume_at when the last attempt failed
        self.seen = 0  # members whose header was read, in the furthest attempt

    # ---- rows
    def row(self, name: str, ordinal: int, key: str | None, side: str | None, data: bytes | None,
            reject: tuple | None) -> None:
        location = f"{self.uri}#{name}"
        while location_id(location, ordinal) in self.claimed:  # e.g. a sample key equal to a member name
            ordinal += 1
        rid = location_id(location, ordinal)
        self.claimed.add(rid)
        self.rows.append({ID: rid, URI: f"{printable_name(self.uri)}#{member_ref(name, ordinal)}",
                          "key": None if key is None else printable_name(key), "sidecars": side, BYTES: data,
                          "_reject": reject})
        self.row_bytes += len(data or b"")

    def shard_reject(self, tag: str, reason: Reason, detail: str) -> None:
        self.rows.append({ID: location_id(f"{self.uri}#<{tag}>"), URI: printable_name(self.uri), "key": None,
                          "sidecars": None, BYTES: None, "_reject": (reason, detail[:500])})

    def emit(self, s: _Sample) -> None:
        side = json.dumps(s.sidecars, sort_keys=True) if s.sidecars else None
        for name, ordinal, data in s.images:
            if s.spoiled:
                self.row(name, ordinal, s.key, None, None, s.spoiled)
            else:
                self.row(name, ordinal, s.key, side, data, None)
        for name, ordinal, reason, detail in s.rejects:
            self.row(name, ordinal, s.key, None, None, (reason, detail))
        if not s.images and not s.rejects:
            self.row(s.key, 1, s.key, side, None,
                     (Reason.MISSING, f"sample {printable_name(s.key)!r} has no image member ({sorted(s.sidecars)})"))

    def emit_current(self) -> None:
        if self.current is not None:
            self.emit(self.current)
            self.current = None

    def full(self, rows_per_block: int) -> bool:
        return len(self.rows) >= rows_per_block or self.row_bytes >= BLOCK_BYTES

    def take(self) -> Iterator[pa.Table]:
        if self.rows:
            yield _shard_table(self.rows)
            self.rows, self.row_bytes = [], 0

    # ---- one attempt
    def read(self, members: _Members, rows_per_block: int) -> Iterator[pa.Table]:
        """Read the shard from its start, skipping the members emitted by earlier attempts."""
        for index, (member, ordinal) in enumerate(members):
            self.seen = max(self.seen, index + 1)
            if index < self.resume_at:
                continue
            problem = _unsafe(member)
            if member.isdir() and not problem:
                continue
            key, ext = _member_key(member.name)
            if self.current is None or key != self.current.key:
                self.emit_current()
                self.current, self.resume_at = _Sample(key), index
                if self.full(rows_per_block):
                    yield from self.take()
            self.member(members, member, ordinal, ext, problem)
        self.emit_current()

    def member(self, members: _Members, member: tarfile.TarInfo, ordinal: int, ext: str,
               problem: str | None) -> None:
        s, name, lim = self.current, member.name, self.limits
        if problem:
            s.rejects.append((name, ordinal, Reason.UNSAFE_PATH, problem))
            return
        is_image = ext.rsplit(".", 1)[-1] in self.extensions
        if is_image and self.keep is not None and not self.keep(printable_name(posixpath.basename(s.key))):
            s.rejects.append((name, ordinal, SKIPPED, "unselected"))  # data read through by the stream
            return
        if is_image and member.size > lim.max_bytes:
            s.rejects.append((name, ordinal, Reason.FILE_TOO_LARGE,
                              f"{member.size} bytes (tar header) > max_bytes {lim.max_bytes}; not read"))
            return
        if is_image and s.image_bytes + member.size > SAMPLE_BYTES:
            s.rejects.append((name, ordinal, Reason.FILE_TOO_LARGE, (
                f"{member.size} bytes (tar header); its sample {printable_name(s.key)!r} already holds "
                f"{s.image_bytes} bytes of images, at most {SAMPLE_BYTES} per sample; not read")))
            return
        if not is_image and s.sidecar_bytes + member.size > lim.max_sidecar_bytes:
            s.sidecar_bytes += member.size
            s.spoiled = s.spoiled or (Reason.FILE_TOO_LARGE, (
                f"sidecar {printable_name(name)!r} is {member.size} bytes; the sample's sidecars exceed "
                f"input.max_sidecar_bytes {lim.max_sidecar_bytes}; not read"))
            return
        try:
            data = members.extract(member)
        except Exception as e:
            if classify_error(e) is not None:  # cut off mid-read: this member is unreadable
                cut = (Reason.READ_ERROR, f"member cut off mid-read ({member.size} bytes declared): "
                                          f"{type(e).__name__}: {e}"[:500])
                if is_image:
                    s.rejects.append((name, ordinal, *cut))
                else:
                    s.spoiled = s.spoiled or (cut[0], f"sidecar {printable_name(name)!r}: {cut[1]}"[:500])
            raise
        if is_image:
            s.images.append((name, ordinal, data))
            s.image_bytes += len(data)
        else:
            s.sidecar_bytes += len(data)
            s.sidecars[printable_name(ext)] = data.decode("utf-8", errors="replace")

    # ---- the end of an attempt
    def rewind(self) -> bool:
        """Forget the sample being read (a reopen reads it again); True if this attempt got
        further than the last one."""
        self.current = None
        progressed, self.failed_at = self.resume_at > self.failed_at, self.resume_at
        return progressed

    def too_big(self, e: _TooBigToSkip) -> None:
        key, _ = _member_key(e.member.name)
        if self.current is None or self.current.key != key:
            self.emit_current()
            self.current = _Sample(key)
        shown = printable_name(e.member.name)
        self.current.rejects.append((e.member.name, e.ordinal, Reason.FILE_TOO_LARGE,
                                     f"{e.member.size} bytes (tar header) > input.max_skip_bytes {e.limit} "
                                     "in a compressed shard; not read"))
        self.emit_current()
        self.shard_reject(f"stopped@{self.seen}", Reason.FILE_TOO_LARGE,
                          f"shard stopped at member {self.seen} ({shown!r}, {e.member.size} bytes declared > "
                          f"input.max_skip_bytes {e.limit}): the members after it were not reached")

    def broken(self, e: Exception, reason: Reason, what: str) -> None:
        self.emit_current()  # members fully read before the break are kept
        if reason == Reason.MISSING:
            self.shard_reject("missing", reason, f"shard not found: {e}")
        elif reason == Reason.PERMISSION_DENIED:
            self.shard_reject("denied", reason, str(e))
        else:
            self.shard_reject(f"broken@{self.seen}", reason,
                              f"{what} after {self.seen} members: {type(e).__name__}: {e}")


def iter_shard(shard_uri: str, storage: StorageConfig, extensions: list[str], rows_per_block: int,
               keep: Callable[[str], bool] | None = None, limits: ReadLimits | None = None) -> Iterator[pa.Table]:
    """Stream one shard as tables of rows (never decoding images); see the module docstring.

    ``keep(basename of key)`` False: the image member is skipped unread (a row without
    bytes, reason ``SKIPPED``, which the catalog join drops or relabels).
    """
    reader = _ShardReader(shard_uri, extensions, keep, limits or ReadLimits())
    fs, path = filesystem(shard_uri, storage)
    retries = 0
    while True:
        try:
            with _open_members(fs, path, reader.limits) as members:
                yield from reader.read(members, rows_per_block)
            break
        except _TooBigToSkip as e:
            reader.too_big(e)
            break
        except _OverBudget as e:
            reader.broken(e, Reason.FILE_TOO_LARGE, "archive stopped: a header is too large")
            break
        except Exception as e:  # noqa: BLE001 - any failure of the archive layer is classified
            reason = classify_error(e)
            if reason is not None:
                reader.broken(e, reason, "archive stream broken")
                break
            retries = 0 if reader.rewind() else retries
            if retries < storage.max_retries:
                time.sleep(retry_delay(storage, retries))
                retries += 1
                continue
            detail = (f"transient error persisted after {storage.max_retries} retries: {type(e).__name__}: {e}; "
                      f"{reader.resume_at} members read, the members after them were not reached")
            if storage.on_transient_exhausted == "fail":
                raise TransientReadError(f"{shard_uri}: {detail}") from e
            reader.shard_reject(f"transient@{reader.resume_at}", Reason.READ_ERROR, detail)
            break
    yield from reader.take()


_SHARD_SCHEMA = pa.schema([(ID, pa.string()), (URI, pa.string()), ("key", pa.string()),
                           ("sidecars", pa.string()), (BYTES, pa.binary())])


def _shard_table(rows: list[dict]) -> pa.Table:
    t = pa.table({f.name: pa.array([r[f.name] for r in rows], f.type) for f in _SHARD_SCHEMA}, schema=_SHARD_SCHEMA)
    return reject_rows(t, Stage.INGEST, [r["_reject"] for r in rows])
