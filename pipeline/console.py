"""The terminal of a CLI run: our lines, one live status line, and Ray's expected noise
filtered out.

A run prints only what the user should read. Ray prints, on every clean run of our plan,
messages that describe the plan working as designed (a token-auth notice, "Started a local
Ray instance", "the cluster does not have any available CPUs" while the embedding actors
hold them, a core worker's note that an actor's constructor arguments live in the object
store, which is how Ray Data passes them to every actor). :data:`EXPECTED` lists them, each
with why it is expected; :func:`install` drops exactly those lines from the process's
stderr (file descriptor 2, so a C++ core worker's line is caught as well as a Python log
record) and passes everything else through. ``-v/--verbose`` installs nothing.

The live line (``status``) is drawn on a terminal only; printing a line clears it first
and redraws it after, so the two never interleave.
"""

from __future__ import annotations

import os
import re
import select
import threading

# (pattern of one line, why it is expected in our plan).
EXPECTED: list[tuple[str, str]] = [
    (r"Token authentication is enabled for this Ray cluster",
     "a local Ray 2.60 enables token auth by default; nothing to do"),
    (r"Started a local Ray instance", "the run starts one when no cluster address is given"),
    (r"Connecting to existing Ray cluster", "the run was given a cluster address"),
    (r"Progress bars disabled\. To enable", "our own progress line replaces Ray Data's bars"),
    (r"Progress will be logged because stdout is a non-interactive terminal", "Ray Data's bars are off"),
    (r"does not have any available CPUs\. The Dataset job will hang",
     "the embedding actors hold their CPUs while later steps wait for them; they are released when the pass ends"),
    (r"has constructor arguments in the object store and max_restarts > 0",
     "Ray Data passes every actor's function through the object store; it stays in scope for the run"),
    (r"Registered dataset logger for dataset", "Ray Data's bookkeeping"),
    (r"Starting execution of Dataset|Execution plan of Dataset|Full logs are in .*ray-data\.log",
     "Ray Data's bookkeeping"),
    (r"Dataset .* execution finished in", "our stage lines report durations"),
    (r"To disable issue detection, run DataContext", "the issue detector's footer (its findings are not dropped)"),
]
_EXPECTED = re.compile("|".join(f"(?:{p})" for p, _ in EXPECTED))


def expected(line: str) -> bool:
    return bool(_EXPECTED.search(line))


class Console:
    """Where the CLI's lines go: ``fd`` (the real stderr), with one status line on a terminal."""

    def __init__(self, fd: int = 2):
        self.fd = fd
        self.tty = os.isatty(fd)
        self.lock = threading.RLock()
        self._status = ""

    def _write(self, data: bytes) -> None:
        while data:
            try:
                n = os.write(self.fd, data)
            except InterruptedError:
                continue
            except OSError:
                return  # the terminal is gone: nothing to show it on
            data = data[n:]

    def line(self, text: str) -> None:
        """One permanent line (the status line, if any, is cleared and redrawn under it)."""
        self.raw(text.rstrip("\n").encode(errors="replace") + b"\n")

    def raw(self, data: bytes) -> None:
        with self.lock:
            if self.tty and self._status:
                self._write(b"\r\x1b[K" + data + self._status.encode(errors="replace"))
            else:
                self._write(data)

    def status(self, text: str) -> None:
        """Replace the live line (a terminal only; elsewhere use :meth:`line`)."""
        if not self.tty:
            return
        with self.lock:
            self._status = text
            self._write(b"\r\x1b[K" + text.encode(errors="replace"))

    def clear_status(self) -> None:
        with self.lock:
            if self.tty and self._status:
                self._write(b"\r\x1b[K")
            self._status = ""


CONSOLE = Console()


class StderrFilter:
    """fd 2 becomes a pipe; a thread copies it to the real stderr line by line, leaving out
    the :data:`EXPECTED` lines. :meth:`close` restores fd 2 and flushes what is left."""

    JOIN_S = 5.0  # close() waits this long for the pump, then reads what is left itself

    def __init__(self):
        self.real = os.dup(2)
        self.console = Console(self.real)
        self._r, w = os.pipe()
        os.dup2(w, 2)
        os.close(w)
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one reader at a time: the pump, or close()'s last drain
        self._pending = b""
        self._thread = threading.Thread(target=self._pump, name="biocurate-stderr", daemon=True)
        self._thread.start()

    def _emit(self, line: bytes) -> None:
        if not expected(line.decode(errors="replace")):
            self.console.raw(line)

    def _take(self, chunk: bytes) -> None:
        self._pending += chunk
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            self._emit(line + b"\n")

    def _pump(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self._r], [], [], 0.1)
                if not ready:
                    if self._stop.is_set():
                        break
                    continue
                with self._lock:
                    chunk = os.read(self._r, 65536)
                    if chunk:
                        self._take(chunk)
            except OSError:
                break
            if not chunk:
                break

    def _drain(self) -> None:
        """What is left in the pipe, read here (non-blocking), and the last partial line."""
        with self._lock:
            os.set_blocking(self._r, False)
            while True:
                try:
                    chunk = os.read(self._r, 65536)
                except (BlockingIOError, OSError):
                    break
                if not chunk:
                    break
                self._take(chunk)
            if self._pending:
                self._emit(self._pending)
                self._pending = b""

    def close(self) -> None:
        import sys

        try:
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
        os.dup2(self.real, 2)  # our end of the pipe is closed: the pump drains and stops
        self._stop.set()
        self._thread.join(timeout=self.JOIN_S)
        # Whatever the pump has not read yet is read here: on a loaded machine the pump
        # thread may not run before the process exits, and a config error's one line (the
        # only line such a run prints) was lost that way (CI: exit 2, empty stderr).
        self._drain()


_FILTER: StderrFilter | None = None
VERBOSE = False  # -v: nothing filtered, Ray's loggers at their own levels


def install(verbose: bool = False) -> Console:
    """Route the CLI's output through a :class:`Console`; unless ``verbose``, filter Ray's
    expected lines. Returns the console our lines and the progress line go to."""
    global _FILTER, CONSOLE, VERBOSE
    VERBOSE = verbose
    if verbose:
        CONSOLE = Console(2)
        return CONSOLE
    if _FILTER is None:
        import atexit

        _FILTER = StderrFilter()
        atexit.register(uninstall)
    CONSOLE = _FILTER.console
    return CONSOLE


def uninstall() -> None:
    global _FILTER, CONSOLE
    if _FILTER is not None:
        CONSOLE.clear_status()
        _FILTER.close()
        _FILTER = None
        CONSOLE = Console(2)
