"""The embedding stage on Ray: model plans, device choice, the actor pool inside the
streaming pass, and the step after it that fills in cached embeddings and grows the cache.

Cache layout (local or S3)::

    <embed.cache_path or <output>/cache/embeddings>/<model id>/<prep signature>-<dtype>/
        blk-<uuid>.parquet                      columns sha256, embedding: one per actor call,
                                                written whole before the call returns
        part-<uuid>/*.parquet + _SUCCESS        (older layout, still read)

``embed.read_caches`` (and ``--previous``) add caches that are read but never written.

The model id is ``<name>@<weights identity>`` (sha256 of the weights file), so swapping a
weights file never reuses embeddings of the old one; the preprocessing signature hashes
what the model sees (``stages.embed.prep_signature``).
"""

from __future__ import annotations

import logging
import posixpath
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from manifests import io as mio
from manifests import rejects
from pipeline import joins
from pipeline.joins import resolve_ref
from manifests.config import ConfigError, PipelineConfig
from stages import embed as emb
from stages.backbones import BackboneError, locate_weights, resolve_spec, weights_identity

log = logging.getLogger("biocurate")


# --------------------------------------------------------------------------- plans

def model_plans(cfg: PipelineConfig) -> list[emb.ModelPlan]:
    """Resolve every configured model (registry entry, dimension check, weights location)
    on the driver, before Ray starts; problems are one-line :class:`ConfigError`."""
    e = cfg.embed
    plans = []
    for m in e.models:
        try:
            s = resolve_spec(m.name, network=m.network, size=m.size, dim=m.dim, output=m.output)
            where = locate_weights(s, m.weights, e.models_dir, cfg.storage)
            model_id = f"{m.name}@{weights_identity(where, cfg.storage)}"
        except BackboneError as err:
            raise ConfigError(f"embed error: {err}") from None
        # Weights found through the models dir or an installed package are looked up again
        # on each worker (its paths may differ from the driver's); explicit ones are passed.
        plans.append(emb.ModelPlan(s, m.weights, model_id, emb.prep_signature(s), e.dtype))
    nd = cfg.near_dedup
    if nd.enabled and nd.semantic and nd.flip and plans:
        base = next(p for p in plans if p.name == e.model_for("dedup"))  # its mirror images too
        plans.append(emb.ModelPlan(base.spec, base.weights, base.model_id, emb.prep_signature(base.spec, True),
                                   base.dtype, flip=True))
    return plans


def aesthetic_active(cfg: PipelineConfig, plans: list[emb.ModelPlan]) -> bool:
    """Whether the aesthetic score runs: its model gives 768-d CLIP projections and its
    weights are there (else a one-line ConfigError, or False with on_missing_weights: skip)."""
    a = cfg.aesthetic
    if a.head == "off" or not plans:
        return False
    name = cfg.embed.model_for("aesthetic")
    plan = next(p for p in plans if p.name == name)
    from stages.aesthetic import DIM, LINEAR_FILE, package_cache_path

    if plan.spec.dim != DIM:
        raise ConfigError(f"aesthetic error: the aesthetic head takes {DIM}-d CLIP L/14 projections; model {name} "
                          f"gives {plan.spec.dim}-d (set embed.roles.aesthetic: vit_l14_pn_quick_gelu_openai-clip)")
    present = bool(a.weights) and Path(a.weights).is_file()
    if a.head == "linear" and not a.weights:
        present = package_cache_path().is_file()
    if not present:
        if a.on_missing_weights == "skip":
            return False
        wanted = a.weights or (package_cache_path() if a.head == "linear" else "aesthetic.weights (not set)")
        raise ConfigError(f"aesthetic error: weights {wanted} not found; get "
                          f"{LINEAR_FILE if a.head == 'linear' else 'sac+logos+ava1-l14-linearMSE.pth'} on a machine "
                          "with network, or set aesthetic.on_missing_weights: skip")
    return True


# --------------------------------------------------------------------------- device

def gpu_capacity() -> tuple[float, float]:
    """(GPUs in the cluster now, GPUs its autoscaler config can add at most)."""
    now = float(ray.cluster_resources().get("GPU", 0))
    try:
        max_cfg = ray._private.state.state.get_max_resources_from_cluster_config() or {}
    except Exception:  # noqa: BLE001 - no autoscaler (local Ray): nothing to add
        max_cfg = {}
    return now, float(max_cfg.get("GPU", 0) or 0)


GPU_WAIT_SAY_S = 5.0  # a GPU not placed within this is said (an autoscaled node takes minutes)


def wait_for_gpu(num_gpus: float, timeout_s: float) -> None:
    """Block until a task asking ``num_gpus`` can run (an autoscaled GPU node started), or
    raise a one-line :class:`ConfigError` after ``timeout_s``."""
    probe = ray.remote(num_cpus=0, num_gpus=num_gpus)(lambda: True).remote()
    t0 = time.monotonic()
    ready, _ = ray.wait([probe], timeout=min(timeout_s, GPU_WAIT_SAY_S))
    if not ready and timeout_s > GPU_WAIT_SAY_S:  # said now, in one line: nothing else moves while it waits
        from pipeline import console

        now, can = gpu_capacity()
        console.CONSOLE.line(f"biocurate: waiting up to embed.gpu_timeout_s={timeout_s:g} s for a GPU "
                             f"({num_gpus:g} per actor): the cluster has {now:g} now, its autoscaler can add up to "
                             f"{can:g}")
        ready, _ = ray.wait([probe], timeout=max(0.0, timeout_s - GPU_WAIT_SAY_S))
        if ready:
            console.CONSOLE.line(f"biocurate: a GPU is available after {time.monotonic() - t0:.0f} s")
    if not ready:
        ray.cancel(probe, force=True)
        raise ConfigError(f"embed error: no GPU became available within embed.gpu_timeout_s={timeout_s:g} s "
                          f"(asked for {num_gpus:g} per actor); check the GPU worker group of the cluster, "
                          f"or set embed.device: cpu")


def resolve_device(cfg: PipelineConfig) -> str:
    """'cuda' or 'cpu' for the embedding actors (see ``embed.device``)."""
    e = cfg.embed
    if e.device == "cpu":
        return "cpu"
    now, can = gpu_capacity()
    if now >= e.num_gpus:
        return "cuda"
    if can >= e.num_gpus:
        wait_for_gpu(e.num_gpus, e.gpu_timeout_s)
        return "cuda"
    if e.device == "auto":
        return "cpu"
    raise ConfigError("embed error: embed.device is cuda, but the Ray cluster has no GPU and its autoscaler config "
                      "can add none; set embed.device: cpu (or auto), or add a GPU worker group")


# --------------------------------------------------------------------------- cache

def cache_root(cfg: PipelineConfig) -> str:
    return cfg.embed.cache_path or mio.join(cfg.output.rstrip("/"), "cache", "embeddings")


def cache_roots(cfg: PipelineConfig) -> list[str]:
    """Where cached embeddings are looked up: this run's cache first (it grows), then the
    caches of a previous run being refreshed (``--previous``; read only)."""
    roots = [cache_root(cfg)]
    for extra in cfg.embed.read_caches:
        if extra not in roots:
            roots.append(extra)
    return roots


def _model_dir(root: str, plan: emb.ModelPlan) -> str:
    return mio.join(root.rstrip("/"), emb.slug(plan.model_id), f"{plan.prep}-{plan.dtype}")


def cache_dir(cfg: PipelineConfig, plan: emb.ModelPlan) -> tuple[object, str]:
    """The folder this run adds ``plan``'s embeddings to."""
    fs, root = mio.filesystem(cache_root(cfg), cfg.storage)
    return fs, _model_dir(root, plan)


def cache_uri(cfg: PipelineConfig, plan: emb.ModelPlan) -> str:
    fs, d = cache_dir(cfg, plan)
    return mio.to_uri(fs, d)


def cache_files(cfg: PipelineConfig, plan: emb.ModelPlan) -> list[tuple[object, list[str]]]:
    """Per cache root (``cache_roots``): its filesystem and the parquet files of ``plan``
    there -- committed ``part-*`` folders and ``blk-*.parquet`` files (written whole by
    the embedding actors); temporary and uncommitted ones are ignored."""
    out = []
    if not cfg.embed.cache:
        return out
    for root in cache_roots(cfg):
        fs, r = mio.filesystem(root, cfg.storage)
        d = _model_dir(r, plan)
        if not fs.exists(d):
            continue
        files = []
        for entry in sorted(fs.ls(d, detail=False)):
            name = posixpath.basename(entry.rstrip("/"))
            if name.startswith("blk-") and name.endswith(".parquet"):
                files.append(entry)
            elif name.startswith("part-") and mio.is_committed(fs, entry):
                files += sorted(p for p in fs.find(entry) if p.endswith(".parquet"))
        if files:
            out.append((fs, files))
    return out


def known_sets(cfg: PipelineConfig, plans: list[emb.ModelPlan]) -> dict[str, np.ndarray]:
    """Per model, the sorted keys of the images its caches already hold (sha256 column
    only, files read in parallel threads)."""
    import pyarrow.dataset as pads

    out = {}
    for p in plans:
        shas: list[str] = []
        for fs, files in cache_files(cfg, p):
            table = pads.dataset(files, filesystem=mio.arrow_filesystem(fs), format="parquet").to_table(
                columns=["sha256"])
            shas += table.column("sha256").to_pylist()
        out[p.name] = emb.known_set(shas)
    return out


def cache_dataset(cfg: PipelineConfig, plan: emb.ModelPlan, wanted: ray.ObjectRef) -> ray.data.Dataset | None:
    """Cache rows of the sha256 keys in ``wanted`` (an object ref of a sorted key array),
    with a null ``id`` so they can be grouped with run rows."""
    parts = [ray.data.read_parquet(files, filesystem=mio.arrow_filesystem(fs), columns=["sha256", "embedding"])
             for fs, files in cache_files(cfg, plan)]
    if not parts:
        return None
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(_cache_rows, batch_format="pyarrow", fn_kwargs={"wanted": wanted, "plan": plan})


def _cache_rows(batch: pa.Table, wanted, plan: emb.ModelPlan) -> pa.Table:
    keep = emb.is_known(resolve_ref(wanted), batch.column("sha256").to_pylist())
    batch = batch.filter(pa.array(keep))
    return pa.table({"id": pa.nulls(len(batch), pa.string()), "sha256": batch.column("sha256"),
                     "embedding": batch.column("embedding").cast(plan.arrow_type())})


# --------------------------------------------------------------------------- inside the pass

class ValidateForModels:
    """Validate + model inputs in one CPU task: the decode that validation makes (covering
    the largest model input) is the one the models see."""

    def __init__(self, cfg: PipelineConfig, plans: list[emb.ModelPlan], known_ref, reuse_ref=None):
        self.cfg, self.plans, self.known_ref, self.reuse_ref = cfg.validate_, plans, known_ref, reuse_ref
        self._known = None  # fetched once per worker, not once per batch
        self._reuse = None

    def __call__(self, batch: pa.Table) -> pa.Table:
        from stages.validate import validate_batch_decodes

        if self._known is None:
            self._known = resolve_ref(self.known_ref)
            self._reuse = resolve_ref(self.reuse_ref) if self.reuse_ref is not None else None
        out, decodes = validate_batch_decodes(batch, self.cfg, emb.cover_size(self.plans), self._reuse)
        return emb.add_model_inputs(out, decodes, self.plans, self._known)


def validate_for_models(cfg: PipelineConfig, ds: ray.data.Dataset, plans: list[emb.ModelPlan],
                        known: dict[str, np.ndarray], reuse=None) -> ray.data.Dataset:
    """validate + the model inputs (CPU tasks), streamed. ``known``: embeddings already
    cached (no model input is cut for them). ``reuse``: an object ref of the sha256 keys not
    to decode (a refresh, see ``pipeline.refresh``)."""
    from pipeline.rundir import map_batches, remote_kwargs

    return map_batches(ds, ValidateForModels(cfg, plans, ray.put(known), reuse), cfg, batch_size=cfg.run.batch_size,
                       batch_format="pyarrow", **remote_kwargs(cfg))


def embed_actors(cfg: PipelineConfig, ds: ray.data.Dataset, plans: list[emb.ModelPlan],
                 device: str) -> ray.data.Dataset:
    """The embedding actors over the model inputs of :func:`validate_for_models`, streamed."""
    e = cfg.embed
    resources = {"num_gpus": e.num_gpus, "num_cpus": 1} if device == "cuda" else {"num_cpus": e.num_cpus}
    # Host memory the actor needs (weights, a copy while loading, activations): a real
    # request, which also keeps Ray Data from fusing the decode tasks into the actor on a
    # CPU-only cluster (the decode would then run serially with the model).
    resources["memory"] = actor_memory(cfg, plans, device)
    from pipeline.rundir import map_batches

    return map_batches(
        ds, emb.EmbedModels, cfg, retries={"max_restarts": cfg.run.max_restarts,
                                           "max_task_retries": cfg.run.max_task_retries},
        batch_format="pyarrow", batch_size=e.batch_size,
        compute=ray.data.ActorPoolStrategy(size=e.concurrency),
        fn_constructor_kwargs={"plans": plans, "device": device, "batch_size": e.batch_size,
                               "num_threads": max(1, int(e.num_cpus)), "compile": e.compile,
                               "models_dir": e.models_dir, "storage": cfg.storage,
                               "cache_dirs": {p.name: cache_uri(cfg, p) for p in plans} if e.cache else {}},
        **resources)


def table_name(plan: emb.ModelPlan) -> str:
    """The output (``stages/<name>``) holding one model's embeddings of the run."""
    return f"embed.{emb.slug(plan.name)}"


def table_names(plan: emb.ModelPlan) -> tuple[str, str]:
    """Where a run directory may hold ``plan``'s embeddings: this version's name, then the
    name runs written before the stage declarations used (``embed_<model>``)."""
    return table_name(plan), f"embed_{emb.slug(plan.name)}"


# An embedding actor's host memory (USS), measured by Ray's issue detector on the demo
# (MobileNetV2, 14 MB of weights, CPU, batch 32 at 224 px): 992 MiB, which the old request
# (1 GiB + 2 x weights) left under the detector's 25% headroom. The parts: the process with
# torch and birder imported, the weights twice (the file and the module while loading), and
# on a CPU the activations of one batch (about 8 MiB per 224 px image for these backbones);
# on a GPU the host holds only the batch's input tensors. Ray's detector asks for 1.25x
# the peak, so the request does too.
ACTOR_BASE = 768 << 20
CPU_ACTIVATIONS_PER_IMAGE = 8 << 20  # at 224 x 224, scaled by area
HEADROOM = 1.25


def actor_memory(cfg: PipelineConfig, plans: list[emb.ModelPlan], device: str = "cpu") -> int:
    """Bytes of host memory to request for one embedding actor (see ``ACTOR_BASE``)."""
    total = ACTOR_BASE
    batch = cfg.embed.batch_size
    for p in plans:
        try:
            where = locate_weights(p.spec, p.weights, cfg.embed.models_dir, cfg.storage)
            fs, path = mio.filesystem(where, cfg.storage)
            total += 2 * int(fs.info(path).get("size") or 0)
        except Exception:  # noqa: BLE001 - an estimate; the load itself reports real problems
            total += 1 << 30
        area = (p.spec.size / 224) ** 2
        if device == "cuda":
            total += int(batch * 3 * p.spec.size ** 2 * 4 * 2)  # float input + its pinned copy
        else:
            total += int(batch * CPU_ACTIVATIONS_PER_IMAGE * area)
    return int(HEADROOM * total)


# --------------------------------------------------------------------------- after the pass

def _run_rows(batch: pa.Table, column: str) -> pa.Table:
    rows = batch.filter(pc.and_(pa.array(rejects.alive(batch)), pc.is_valid(batch["sha256"])))
    return pa.table({"id": rows.column("id"), "sha256": rows.column("sha256"), "embedding": rows.column(column)})


def _computed(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.is_valid(batch["embedding"]))


def _missing(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(pc.is_valid(batch["embedding"])))


def _keys(batch: pa.Table) -> pa.Table:
    return pa.table({"key": emb.key_array(emb.cache_keys(batch.column("sha256").to_pylist()))})


def _narrow_resolved(batch: pa.Table) -> pa.Table:
    return batch.select(["id", "sha256", "embedding"])


def resolve_embeddings(cfg: PipelineConfig, narrow: ray.data.Dataset,
                       plan: emb.ModelPlan) -> tuple[ray.data.Dataset, dict]:
    """The run's embedding table of ``plan`` (id, sha256, embedding) for every alive row of
    ``narrow``, and the counts; new embeddings are added to the cache."""
    rows = narrow.map_batches(_run_rows, batch_format="pyarrow", fn_kwargs={"column": plan.column}).materialize()
    computed = rows.map_batches(_computed, batch_format="pyarrow").materialize()
    missing = rows.map_batches(_missing, batch_format="pyarrow").materialize()
    n_computed, n_missing = computed.count(), missing.count()  # computed: the actors cached them already
    table = computed
    if n_missing:
        keys = np.unique(np.array([r["key"] for r in missing.map_batches(_keys, batch_format="pyarrow").take_all()],
                                  dtype="S16"))
        cached = cache_dataset(cfg, plan, ray.put(keys))
        if cached is None:
            raise RuntimeError(f"embedding cache of {plan.model_id} is gone: {n_missing} rows expected cached")
        small = joins.collect_small(cached.drop_columns(["id"]), int(cfg.run.broadcast_join_mb * 2**20))
        if small is not None:  # the cached embeddings fit a broadcast: look them up per batch
            resolved = joins.join(missing.drop_columns(["embedding"]), small, "sha256", "left_outer",
                                  cfg.run.broadcast_join_mb, unique=True).materialize()
        else:
            groups = missing.union(cached)
            resolved = joins.map_groups(groups, "sha256", emb.resolve_group, joins.shuffle_partitions(n_missing),
                                        {"plan": plan}).materialize()
        lost = _count_null(resolved)
        if lost:
            raise RuntimeError(f"embedding cache of {plan.model_id} lost {lost} entries during the run; run again")
        table = computed.union(resolved.map_batches(_narrow_resolved, batch_format="pyarrow"))
    counts = {"model_id": plan.model_id, "prep": plan.prep, "dim": plan.spec.dim, "dtype": plan.dtype,
              "l2_normalized": plan.spec.l2_normalize, "computed": n_computed, "cached": n_missing}
    return table, counts


def _null_count(batch: pa.Table) -> pa.Table:
    return pa.table({"n": [batch.column("embedding").null_count]})


def _count_null(ds: ray.data.Dataset) -> int:
    return int(sum(r["n"] for r in ds.map_batches(_null_count, batch_format="pyarrow").take_all()))


def drop_embeddings(batch: pa.Table) -> pa.Table:
    """The narrow table without ``emb_*`` columns (they live in the embedding tables)."""
    return batch.drop_columns([c for c in batch.column_names if c.startswith("emb_")])


__all__ = ["BackboneError", "model_plans", "resolve_device", "resolve_embeddings", "validate_for_models", "embed_actors", "table_name", "known_sets",
           "drop_embeddings", "wait_for_gpu", "gpu_capacity", "cache_root"]
