"""A per-call time limit that works in any thread.

Decoders spend their time in C, but Pillow feeds them from a Python loop (one
``decoder.decode`` call per chunk of input), so an exception raised asynchronously in the
decoding thread lands between two chunks. One daemon watchdog thread per process serves
every deadline; ``signal.alarm`` is not used because Ray may call a stage outside the main
thread.

It cannot stop one long C call (a whole image in simplejpeg, libwebp or libtiff, or a
64 KB chunk of a many-scan JPEG): such decodes run in ``stages.decode_pool``'s child
process, which is killed at the limit.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
from contextlib import contextmanager


class DeadlineExceeded(BaseException):
    """Raised inside a :func:`deadline` block that ran past its limit.

    A ``BaseException`` so that a decoder's own ``except Exception`` cannot swallow it.
    """


_lock = threading.Condition()
_heap: list[tuple[float, int, int]] = []  # (due, token, thread id)
_active: dict[int, bool] = {}  # token -> fired
_tokens = itertools.count()
_watchdog: threading.Thread | None = None


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else ctypes.c_void_p(0)
    )


def _watch() -> None:
    with _lock:
        while True:
            while _heap and _heap[0][1] not in _active:
                heapq.heappop(_heap)
            if not _heap:
                _lock.wait()
                continue
            due, token, tid = _heap[0]
            now = time.monotonic()
            if now < due:
                _lock.wait(due - now)
                continue
            heapq.heappop(_heap)
            if token in _active:
                _active[token] = True
                _raise_in(tid, DeadlineExceeded)


@contextmanager
def deadline(seconds: float | None):
    """Raise :class:`DeadlineExceeded` in this thread if the block runs past ``seconds``.

    ``None`` or ``<= 0`` means no limit. The exception is raised at the next Python
    bytecode the thread executes after the limit.
    """
    global _watchdog
    if not seconds or seconds <= 0:
        yield
        return
    token = next(_tokens)
    with _lock:
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="biocurate-deadline", daemon=True)
            _watchdog.start()
        _active[token] = False
        heapq.heappush(_heap, (time.monotonic() + seconds, token, threading.get_ident()))
        _lock.notify()
    try:
        yield
    finally:
        with _lock:
            fired = _active.pop(token, False)
        if fired:
            # The exception may still be pending if the block ended right after it fired:
            # clear it so it cannot escape into unrelated code.
            _raise_in(threading.get_ident(), None)
