"""Live progress of a run: per stage, rows done / total (when known), rate and ETA.

On a terminal one line is redrawn in place; elsewhere (a Ray job's log, CI) one line per
stage every ``run.progress_interval_s`` seconds, and one when a stage ends. The rows come
from Ray Data's executions, read in the driver by :class:`RowsCallback` (an execution
callback) from the last operator before the write; ``run.progress_bars: false`` turns it
all off. The formatting is plain functions (:func:`status_line`), tested without Ray.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

from ray.data._internal.execution.execution_callback import ExecutionCallback


def duration(s: float) -> str:
    s = max(0, int(round(s)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


@dataclass
class StageProgress:
    name: str
    started: float
    done: int = 0
    total: int | None = None
    peak: int = 0  # the most rows any of the stage's executions has handled
    step_started: float = field(default=0.0)  # the current Ray Data execution
    gpu_wait_since: float | None = None  # since when some of its GPU actors wait for a GPU
    gpu_warned: bool = False

    def rate(self, now: float) -> float | None:
        dt = now - (self.step_started or self.started)
        return self.done / dt if self.done and dt > 0 else None


def status_line(p: StageProgress, now: float) -> str:
    """``embed  1,234/10,000 rows  57.3 rows/s  ETA 2m33s  (21s)``."""
    parts = [f"biocurate: {p.name}:"]
    if p.done or p.total:
        parts.append(f"{p.done:,}/{p.total:,} rows" if p.total else f"{p.done:,} rows")
    else:  # no rows out yet (a shuffle, actors starting): say it runs, not an empty field
        parts.append("running")
    rate = p.rate(now)
    if rate:
        parts.append(f"{rate:,.1f} rows/s")
        if p.total and p.total > p.done:
            parts.append(f"ETA {duration((p.total - p.done) / rate)}")
    parts.append(f"({duration(now - p.started)})")
    return "  ".join(parts)


# A progress line (status or done), as opposed to a warning or an error line.
PROGRESS_LINE = re.compile(r"^biocurate: (?!run failed|warning|error|config error)[^:]+?"
                           r"(: .*\(\d+[hms][0-9hms]*\)| done: .*)$")


def is_progress(line: str) -> bool:
    return bool(PROGRESS_LINE.match(line))


# A stage's GPU actor not placed for this long is said once (a warning line), live: a run
# whose GPUs are held by another job otherwise shows only a line that does not move.
GPU_WAIT_WARN_S = 60.0


def gpu_wait_line(stage: str, waiting: int, actors: int, gpus_each: float, free: float, total: float,
                  waited_s: float) -> str:
    head = f"{stage}: {waiting} of {actors} GPU actors ({gpus_each:g} GPU each) have waited {duration(waited_s)}"
    meanwhile = ("it runs on the others meanwhile" if waiting < actors
                 else "nothing runs until one is free")
    if free >= gpus_each:  # GPUs are free: the actor waits for its CPU or memory
        return (f"{head} to be placed, with {free:g} of {total:g} GPUs free (the node lacks the CPU "
                f"or memory they ask): {meanwhile}")
    ours = (actors - waiting) * gpus_each
    who = ("this run's other actors hold them: more actors than GPUs (embed.concurrency)"
           if ours >= total - free - 1e-9 and ours > 0 else "another job holds them")
    return f"{head} for a GPU; the cluster has {free:g} of {total:g} GPUs free ({who}): {meanwhile}"


def cluster_gpus() -> tuple[float, float]:
    """(GPUs free now, GPUs in the cluster)."""
    import ray

    return float(ray.available_resources().get("GPU", 0)), float(ray.cluster_resources().get("GPU", 0))


def unplaced_gpu_requests() -> int:
    """Tasks and actors asking for a GPU that the cluster has not placed: its pending
    resource demand, as ``ray status`` shows it. (An actor that holds its GPU and is still
    loading its model is pending to Ray Data, but placed: it is not counted.)"""
    import ray
    from ray.autoscaler.v2.sdk import get_cluster_resource_state

    state = get_cluster_resource_state(ray._private.worker.global_worker.gcs_client)
    return sum(int(r.count) for r in state.pending_resource_requests
               if float(r.request.resources_bundle.get("GPU", 0)) > 0)


def done_line(p: StageProgress, now: float) -> str:
    took = now - p.started
    rows = f"{p.peak:,} rows in " if p.peak else ""
    rate = f" ({p.peak / took:,.1f} rows/s)" if p.peak and took > 0 else ""
    return f"biocurate: {p.name} done: {rows}{duration(took)}{rate}"


class Progress:
    """The run's progress reporter: :meth:`start` / :meth:`finish` around each step (the
    plan), :meth:`rows` from Ray Data (:class:`RowsCallback`). A thread redraws the line."""

    def __init__(self, console, interval_s: float = 30.0, enabled: bool = True, clock=time.time,
                 gpu_wait_warn_s: float = GPU_WAIT_WARN_S):
        self.console, self.interval_s, self.enabled, self.clock = console, interval_s, enabled, clock
        self.gpu_wait_warn_s = gpu_wait_warn_s
        self.warnings: list[str] = []  # said live, and added to the summary's warnings
        self.current: StageProgress | None = None
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_line = 0.0

    # the plan's side
    def start(self, name: str) -> None:
        with self.lock:
            now = self.clock()
            self.current = StageProgress(name, now)
            self._last_line = now
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._tick, name="biocurate-progress", daemon=True)
            self._thread.start()
        self._draw(force=True)

    def finish(self) -> None:
        with self.lock:
            p, self.current = self.current, None
        if p is None or not self.enabled:
            return
        self.console.clear_status()
        self.console.line(done_line(p, self.clock()))

    def close(self) -> None:
        self._stop.set()
        with self.lock:
            self.current = None
        if self.enabled:
            self.console.clear_status()

    # Ray Data's side (the executor's thread)
    def execution_started(self) -> None:
        with self.lock:
            if self.current is not None:
                self.current.done, self.current.total, self.current.step_started = 0, None, self.clock()
                self.current.gpu_wait_since = None  # a wait is timed within one execution

    def rows(self, done: int, total: int | None) -> None:
        with self.lock:
            if self.current is not None:
                self.current.done = done
                self.current.peak = max(self.current.peak, done)
                if total:
                    self.current.total = max(total, done)

    def gpu_actors(self, waiting: int, actors: int, gpus_each: float) -> None:
        """From Ray Data: of the current execution's ``actors`` asking ``gpus_each`` GPU,
        ``waiting`` are not placed. Said once per stage, after :attr:`gpu_wait_warn_s`."""
        with self.lock:
            p = self.current
            if p is None:
                return
            now = self.clock()
            if waiting <= 0:
                p.gpu_wait_since = None
                return
            if p.gpu_wait_since is None:
                p.gpu_wait_since = now
            if p.gpu_warned or now - p.gpu_wait_since < self.gpu_wait_warn_s:
                return
            p.gpu_warned = True
            stage, waited = p.name, now - p.gpu_wait_since
        free, total = cluster_gpus()
        self.warn(gpu_wait_line(stage, waiting, actors, gpus_each, free, total, waited))

    def warn(self, text: str) -> None:
        """One warning line, now (it also goes into the summary's warnings)."""
        with self.lock:
            if text in self.warnings:
                return
            self.warnings.append(text)
        self.console.line(f"biocurate: warning: {text}")

    # drawing
    def _draw(self, force: bool = False) -> None:
        if not self.enabled:
            return
        with self.lock:
            p = self.current
            if p is None:
                return
            now = self.clock()
            text = status_line(p, now)
            due = force or now - self._last_line >= self.interval_s
            if not self.console.tty and due:
                self._last_line = now
        if self.console.tty:
            self.console.status(text)
        elif due and not force:
            self.console.line(text)

    def _tick(self) -> None:
        while not self._stop.wait(0.5 if self.console.tty else min(1.0, self.interval_s)):
            try:
                self._draw()
            except Exception:  # noqa: BLE001 - progress must never break a run
                pass


PROGRESS: Progress | None = None


class RowsCallback(ExecutionCallback):
    """Feeds :data:`PROGRESS` from each Ray Data execution: the rows out of its last
    operator before a write, and Ray's estimate of their total; and its GPU actors that
    wait for a GPU."""

    GPU_POLL_S = 5.0  # the cluster's demand is read at most this often

    def __init__(self):
        self._gpu_polled = 0.0

    def before_execution_starts(self, executor) -> None:
        if PROGRESS is not None:
            PROGRESS.execution_started()

    def on_execution_step(self, executor) -> None:
        if PROGRESS is None:
            return
        try:
            # A write is fused into the operator before it ("MapBatches(_compact)->Write") and
            # counts files, not rows: the rows are those of the operator before it.
            ops = [op for op in executor._topology if op.name != "Input" and "Write" not in op.name]
            if not ops:
                return
            op = ops[-1]
            PROGRESS.rows(int(op.metrics.row_outputs_taken or 0), op.num_output_rows_total())
        except Exception:  # noqa: BLE001 - Ray internals moved: the line shows elapsed time only
            pass
        try:
            self._gpu_step(executor)
        except Exception:  # noqa: BLE001 - Ray internals moved: no GPU-wait warning
            pass

    def _gpu_step(self, executor) -> None:
        now = time.monotonic()
        if now - self._gpu_polled < self.GPU_POLL_S:
            return
        self._gpu_polled = now
        pending = actors = 0
        gpus_each = 0.0
        for op in executor._topology:
            for pool in op.get_autoscaling_actor_pools():
                gpus = float(pool.per_actor_resource_usage().gpu or 0)
                if gpus > 0:
                    gpus_each = gpus
                    pending += pool.num_pending_actors()
                    actors += pool.num_pending_actors() + pool.num_running_actors()
        if actors == 0:
            return
        waiting = min(pending, unplaced_gpu_requests()) if pending else 0
        PROGRESS.gpu_actors(waiting, actors, gpus_each)
