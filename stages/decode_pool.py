"""Decodes that can be stopped: one persistent child process, killed and replaced when a
decode runs past its time limit.

``stages.deadline`` raises between Python bytecodes, so it cannot stop a decoder that spends
seconds in one C call (simplejpeg, libwebp, libtiff, a 64 KB chunk of a scan-bomb JPEG in
Pillow). :class:`DecodeProcess` runs such decodes in a child; when the child has not
answered by the limit it is killed (SIGKILL), the caller gets :class:`DecodeTimeout`, and
the next call starts a fresh child. A decoder crash (segfault, out of memory) kills only
the child: :class:`DecodeCrashed`.

The child is a fresh interpreter started with ``subprocess`` (fork+exec, safe from a
threaded parent such as a Ray worker; multiprocessing's spawn would also re-import the
parent's ``__main__``, a Ray worker's entry point) running ``python -m stages.decode_pool``.
It talks over a socket pair with framed messages: a JSON header, then raw bytes (the
encoded file one way, uint8 arrays back); nothing is pickled in either direction. It
exits when the parent closes its end or dies (end of file, or its parent id changes), and
the parent kills it at exit: no orphans.

One child per process, started on first use and reused across rows (:func:`shared`); the
decode itself is the caller's function, named by ``"module:function"`` and imported in the
child, so this module knows nothing about images.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from multiprocessing import BufferTooShort
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

_ROOT = str(Path(__file__).resolve().parent.parent)  # the package root, for the child's imports
_START_TIMEOUT_S = 120.0  # the child's own imports (numpy, Pillow, cv2); not counted to any file
_MAX_REPLY_BYTES = 1 << 30  # a reply header or array larger than this is a broken child


class DecodeUnavailable(RuntimeError):
    """No child could be started: the environment is broken, not the input."""


class DecodeTimeout(Exception):
    """The child did not answer within the time limit; it has been killed."""


class DecodeCrashed(Exception):
    """The child died while decoding (signal or exit code in the message)."""


class DecodeRejected(Exception):
    """The decode function in the child raised ``reason``/``detail`` (a reject)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


class DecodeFailed(Exception):
    """The decode function in the child raised any other exception (its type and text)."""


class DecodeProcess:
    """A child process running ``func(data, params) -> (meta, arrays)`` on request.

    ``func`` is ``"module:function"``; it returns a JSON-serializable ``meta`` and a list
    of numpy arrays (or None). An exception with ``reason`` and ``detail`` attributes comes
    back as :class:`DecodeRejected`, any other as :class:`DecodeFailed`.
    """

    def __init__(self, func: str):
        self.func = func
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._ready = False
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self.started = 0  # children started so far (a replacement after a kill counts)
        self.startup_s = 0.0  # how long the last run waited for a child to start

    @property
    def pid(self) -> int | None:
        """The current child's process id, None when none is running."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def run(self, data: bytes, params: dict, timeout: float | None) -> tuple[dict, list[np.ndarray | None]]:
        """Run the function on ``data`` in the child; wait at most ``timeout`` seconds
        (None: no limit) once the child is ready (its start-up is not counted). After a
        timeout or a crash the child is replaced at once, so its successor starts up
        while this process goes on with other rows."""
        with self._lock:
            t0 = time.perf_counter()
            try:
                self._ensure_ready()
            finally:
                self.startup_s = time.perf_counter() - t0
            try:
                return self._exchange(data, params, timeout)
            except (DecodeTimeout, DecodeCrashed):
                self.close()
                try:  # the successor starts while this process goes on with other rows
                    self._spawn()
                except OSError:  # cannot start one now: the next run() tries again; this
                    pass  # row keeps its own reject (a timeout, not a spawn failure)
                raise

    def close(self) -> None:
        """Kill the child (if any) and reap it; the next :meth:`run` starts a new one."""
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        self._ready = False
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    # ------------------------------------------------------------------ internals

    def _spawn(self) -> None:
        """Start a child (without waiting for it to be ready)."""
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([_ROOT, *filter(None, [env.get("PYTHONPATH")])])
        # glibc raises its mmap threshold after a large free, and the next full-size decode
        # then stays in the heap when freed: a fixed threshold returns every decode's
        # memory to the system (measured: +84 MB kept after one 4096^2 RGBA PNG without it).
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "stages.decode_pool", str(theirs.fileno()), self.func],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, env=env, cwd=_ROOT)
        finally:
            theirs.close()
        self._conn = Connection(ours.detach())
        self._ready = False
        self.started += 1

    def _ensure_ready(self) -> None:
        if self._pid != os.getpid():  # this object was inherited through a fork: not our child
            self._proc, self._conn, self._ready, self._pid = None, None, False, os.getpid()
        if self._proc is not None and self._proc.poll() is not None:
            self.close()  # died while idle
        if self._proc is None:
            self._spawn()
        if self._ready:
            return
        if not self._conn.poll(_START_TIMEOUT_S) or self._recv_header() != {"ready": True}:
            self.close()
            raise DecodeUnavailable(f"decode process ({sys.executable} -m stages.decode_pool) did not start "
                                    f"within {_START_TIMEOUT_S:g} s; see its error above")
        self._ready = True

    def _exchange(self, data: bytes, params: dict, timeout: float | None) -> tuple[dict, list[np.ndarray | None]]:
        try:
            self._conn.send_bytes(json.dumps(params).encode())
            self._conn.send_bytes(data)
        except OSError as e:  # the child died before reading
            raise DecodeCrashed(self._death(e)) from None
        due = None if timeout is None else time.monotonic() + max(0.0, timeout)
        head = self._wait_recv(due)
        if "reason" in head:
            raise DecodeRejected(head["reason"], head["detail"])
        if "error" in head:
            raise DecodeFailed(head["error"])
        arrays = []
        for spec in head["arrays"]:
            if spec is None:
                arrays.append(None)
                continue
            dtype = np.dtype(spec["dtype"])
            buf = bytearray(int(np.prod(spec["shape"])) * dtype.itemsize)  # a writable array, no copy
            self._wait_recv(due, into=buf)
            arrays.append(np.frombuffer(buf, dtype=dtype).reshape(spec["shape"]))
        return head["meta"], arrays

    def _wait_recv(self, due: float | None, into: bytearray | None = None):
        """The next message (a JSON header, or raw bytes received ``into`` a buffer of their
        exact size), waiting until ``due`` at most."""
        left = None if due is None else max(0.0, due - time.monotonic())
        try:
            if not self._conn.poll(left):
                raise DecodeTimeout(f"no answer within {left:.3g} s")
            if into is not None:
                if self._conn.recv_bytes_into(into) != len(into):
                    raise OSError("array message of the wrong size")
                return None
            return json.loads(self._conn.recv_bytes(_MAX_REPLY_BYTES))
        except (EOFError, OSError, BufferTooShort, ValueError) as e:
            raise DecodeCrashed(self._death(e)) from None

    def _recv_header(self) -> dict:
        try:
            return json.loads(self._conn.recv_bytes(_MAX_REPLY_BYTES))
        except (EOFError, OSError, ValueError):
            return {}

    def _death(self, err: BaseException) -> str:
        rc = None
        if self._proc is not None:
            try:
                rc = self._proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        if rc is None:
            return f"decode process sent a broken answer ({type(err).__name__}: {err})"
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        return f"decode process died ({how}; {type(err).__name__})"


_shared: dict[str, DecodeProcess] = {}
_shared_lock = threading.Lock()


def shared(func: str) -> DecodeProcess:
    """This process's child for ``func`` (one per process and function, reused)."""
    with _shared_lock:
        proc = _shared.get(func)
        if proc is None:
            proc = _shared[func] = DecodeProcess(func)
        return proc


@atexit.register
def _close_all() -> None:
    for proc in list(_shared.values()):
        proc.close()


# ---------------------------------------------------------------------- the child


def _watch_parent(ppid: int) -> None:
    """Exit as soon as the parent is gone (reparented), even mid-decode."""
    while True:
        time.sleep(1.0)
        if os.getppid() != ppid:
            os._exit(0)


def _reply(conn: Connection, meta: dict, arrays: list[np.ndarray | None]) -> None:
    arrays = [None if a is None else np.ascontiguousarray(a) for a in arrays]
    specs = [None if a is None else {"shape": list(a.shape), "dtype": a.dtype.str} for a in arrays]
    conn.send_bytes(json.dumps({"meta": meta, "arrays": specs}).encode())
    for a in arrays:
        if a is not None:
            conn.send_bytes(memoryview(a).cast("B"))


def _die_with_parent() -> None:
    """Linux: the kernel kills this process when its parent dies, even while a decoder
    holds the GIL in C (the watcher thread below cannot run then)."""
    try:
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the watcher alone
        pass


def _serve(fd: int, func_name: str) -> None:
    ppid = os.getppid()
    _die_with_parent()
    if os.getppid() != ppid:  # the parent died before the death signal was set
        os._exit(0)
    threading.Thread(target=_watch_parent, args=(ppid,), daemon=True).start()
    module, _, attr = func_name.partition(":")
    func = getattr(importlib.import_module(module), attr)
    conn = Connection(fd)
    conn.send_bytes(b'{"ready": true}')
    while True:
        try:
            params = json.loads(conn.recv_bytes())
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            meta, arrays = func(data, params)
        except Exception as e:  # noqa: BLE001 - every failure goes back to the parent
            if hasattr(e, "reason") and hasattr(e, "detail"):
                head = {"reason": str(e.reason), "detail": str(e.detail)}
            else:
                head = {"error": f"{type(e).__name__}: {e}"[:500]}
            conn.send_bytes(json.dumps(head).encode())
            continue
        del data
        _reply(conn, meta, arrays)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2])
