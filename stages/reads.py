"""Reading storage: which failures are worth a retry, retries with backoff, and reads
bounded in size. Used by every reader (``stages.ingest``, ``stages.shards``)."""

from __future__ import annotations

import time

from manifests.config import StorageConfig
from manifests.schema import Reason

_TRANSIENT_MARKERS = (
    "slowdown", "throttl", "internalerror", "serviceunavailable", "service unavailable",
    "requesttimeout", "timed out", "timeout", "connection", "503", "500 ", "502", "504",
    "toomanyrequests", "please reduce your request rate",
)


class TransientReadError(OSError):
    """A storage error that outlived its retries (raised only in 'fail' mode)."""


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
    text = f"{type(exc).__name__} {exc}"
    for name in (getattr(exc, "filename", None), getattr(exc, "filename2", None)):
        if name:  # a path such as shard-000503.tar is not an HTTP 503
            text = text.replace(str(name), "")
    text = text.lower()
    if any(m in text for m in _TRANSIENT_MARKERS):
        return None
    return Reason.READ_ERROR


def read_with_retry(read, what: str, storage: StorageConfig) -> bytes | tuple[Reason, str]:
    """Call ``read()``; retry transient failures with backoff. Returns the bytes or
    ``(reason, detail)`` for a permanent failure."""
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
            time.sleep(retry_delay(storage, attempt))
    raise AssertionError("unreachable")


def retry_delay(storage: StorageConfig, attempt: int) -> float:
    """Seconds to wait before retry ``attempt`` (0-based): ``retry_base_s`` doubled each
    time, capped at 20 s."""
    return min(storage.retry_base_s * 2 ** attempt, 20.0)


def read_at_most(fs, path: str, max_bytes: int | None) -> bytes:
    """The object's bytes, at most ``max_bytes + 1`` of them (one ranged GET on S3): more
    than ``max_bytes`` means too large, and the rest is never transferred."""
    if max_bytes is None:
        return fs.cat_file(path)
    try:
        return fs.cat_file(path, start=0, end=max_bytes + 1)
    except OSError as e:  # S3 answers a range on an empty object with 416 "range not satisfiable"
        if "range" in str(e).lower() and fs.size(path) == 0:
            return b""
        raise


def too_large_detail(fs, path: str, max_bytes: int) -> str:
    """``file_too_large`` detail of an object read past ``max_bytes`` (its size from a HEAD)."""
    try:
        return f"{int(fs.size(path))} bytes > max_bytes {max_bytes}; read stopped after {max_bytes + 1}"
    except Exception:  # noqa: BLE001 - the size is only for the detail
        return f"more than max_bytes {max_bytes} bytes; read stopped after {max_bytes + 1}"
