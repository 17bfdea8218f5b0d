"""The run directory and Ray start-up, shared by the plan and every stage declaration.

A stage's outputs live in ``<output>/stages/<stage>`` (and ``stages/<stage>.<part>``),
each written under a temporary name and committed with a ``_SUCCESS`` marker holding its
fingerprint (``pipeline.stage``); ``--resume`` reuses an output whose marker matches.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import ray

import manifests.schema as schema
from manifests import io as mio
from manifests.config import PipelineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


IDLE_WORKER_MS = 600_000


def init_ray(cfg: PipelineConfig) -> None:
    address = cfg.run.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        pass
    elif address:
        ray.init(address=address, log_to_driver=True)
    else:
        env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        # Idle workers are kept (Ray's default kills them after 1 s once there are more
        # than CPUs): every global step is a few short Ray Data executions, and a fresh
        # worker process pays seconds of imports (torch) before its first task.
        ray.init(num_cpus=cfg.run.num_cpus, include_dashboard=False, runtime_env={"env_vars": env},
                 log_to_driver=False, _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_MS})
    ctx = ray.data.DataContext.get_current()
    # Our own progress line (pipeline.progress, fed by this callback) replaces Ray Data's
    # per-execution bars: a stage is several executions with operator names of no meaning
    # to the user.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    from pipeline import console, progress

    if progress.RowsCallback not in ctx.custom_execution_callback_classes:
        ctx.custom_execution_callback_classes.append(progress.RowsCallback)
    if not console.VERBOSE:
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    # Global steps group narrow rows by key; the plain hash shuffle starts far faster than
    # the default (v2) on small and medium tables and keeps memory bounded per partition.
    ctx.shuffle_strategy = ray.data.context.ShuffleStrategy.HASH_SHUFFLE
    # Ray 2.60's parquet reader (datasource V2) starts 32 footer-reader actors for every
    # read_parquet: every stage reads its upstream table, so on a small node that was
    # minutes of process start-up per run (a 30-row filter stage took 2 min). The V1 reader
    # reads footers in its read tasks.
    ctx.use_datasource_v2 = False
    # An embedding actor's call is idempotent (its output, and the cache file it adds, are
    # the same when repeated): retry it on I/O errors too, not only when its process died.
    ctx.actor_task_retry_on_errors = [OSError]


def remote_kwargs(cfg: PipelineConfig) -> dict:
    """Named remote parameters of a per-row CPU stage's ``map_batches``: one CPU per task and
    ``run.concurrency`` as its compute strategy (Ray Data's ``concurrency`` is deprecated).
    The bounded retries are applied by :func:`bounded_retries`."""
    kw: dict = {"num_cpus": 1}
    if cfg.run.concurrency:
        kw["compute"] = ray.data.TaskPoolStrategy(size=cfg.run.concurrency)
    return kw


def map_batches(ds: ray.data.Dataset, fn, cfg: PipelineConfig, retries: dict | None = None,
                **kwargs) -> ray.data.Dataset:
    """``ds.map_batches(fn, **kwargs)`` (named parameters only) with its task retries bounded
    by ``run.max_task_retries``, or by the actor options ``retries`` (``max_restarts``,
    ``max_task_retries``).

    Ray Data's default retries a task or actor whose worker died forever (-1), so an input
    that kills its worker (a native crash, an OOM kill) would stall the run instead of
    failing it. Ray 2.60 has no named parameter for that bound: it travels only in
    ``ray_remote_args``, whose deprecation (removal in Ray 2.64; ray is pinned at 2.60) is
    silenced here, for this call only."""
    import warnings

    retries = retries or {"max_retries": cfg.run.max_task_retries}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, **retries)


def _compact(batch: pa.Table) -> pa.Table:
    return batch.combine_chunks()


def write_parquet_dir(ds: ray.data.Dataset, fs, tmp: str) -> None:
    """Write ``ds`` as parquet files under ``tmp`` (an empty dataset: one empty file with
    its schema, so readers still see the columns)."""
    fs.makedirs(tmp, exist_ok=True)
    # On S3 a "folder" exists only once an object is in it: without one, Ray Data thinks it
    # created the folder and, when no row was written, fails deleting it.
    keep = mio.join(tmp, ".writing")
    fs.pipe(keep, b"")
    # One chunk per column before writing: parquet gets a row group per chunk, and a block
    # assembled from many small tables (map_groups: one per group) would be written as
    # thousands of one-row groups that every later read pays for.
    ds.map_batches(_compact, batch_format="pyarrow", batch_size=None).write_parquet(
        tmp, filesystem=mio.arrow_filesystem(fs))
    fs.rm(keep)
    fs.invalidate_cache(tmp)
    try:
        written = fs.find(tmp)
    except FileNotFoundError:  # S3: nothing was written under the prefix
        written = []
    if not any(p.endswith(".parquet") for p in written):
        import pyarrow.parquet as pq

        found = ds.schema()
        empty_schema = found.base_schema if found is not None else schema.EMPTY_NARROW
        with fs.open(mio.join(tmp, "empty.parquet"), "wb") as f:
            pq.write_table(empty_schema.empty_table(), f)


@dataclass
class RunDir:
    cfg: PipelineConfig
    fs: object = field(init=False)
    root: str = field(init=False)

    def __post_init__(self):
        self.fs, self.root = mio.filesystem(self.cfg.output, self.cfg.storage)
        self.afs = mio.arrow_filesystem(self.fs)

    def path(self, *parts: str) -> str:
        return mio.join(self.root, *parts)

    def stage_done(self, name: str, fp: str) -> bool:
        marker = mio.read_marker(self.fs, self.path("stages", name))
        return bool(marker) and marker.get("fingerprint") == fp

    def write(self, ds: ray.data.Dataset, final: str, marker: dict, before_commit=None) -> None:
        """Write ``ds`` as parquet under a temporary name, then commit it (marker last).
        ``before_commit()``: called once ``ds`` has run, before the marker is written."""
        tmp = mio.temp_path(self.fs, final)
        write_parquet_dir(ds, self.fs, tmp)
        if before_commit is not None:
            before_commit()
        mio.commit(self.fs, tmp, final, marker)

    def read(self, final: str) -> ray.data.Dataset:
        if not mio.is_committed(self.fs, final):
            raise FileNotFoundError(f"{final} is not committed")
        files = sorted(p for p in self.fs.find(final) if p.endswith(".parquet"))
        return ray.data.read_parquet(files, filesystem=self.afs)
