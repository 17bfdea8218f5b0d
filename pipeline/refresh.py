"""A periodic refresh against a previous run (``--previous <run dir>``, ``refresh.*``).

The previous run directory is only read. What a refresh takes from it:

* **validation**: images it validated (same sha256, same validate settings and code, and
  an embedding cached for every model) are not decoded again; their validate columns,
  a validate reject included, are copied from its manifest (``fill_reused``);
* **embeddings**: its cache is read (``embed.read_caches``), so its images cost no model call;
* **near-duplicates**: the images it kept (curated, or valid but not sampled) come first
  in their groups, so a new copy of a kept image is the one removed and the kept set is
  stable (``prior_keys``);
* **sampling**: its centroids, when its levels and model match: cluster ids stay stable
  (``previous_levels``);
* **diff**: ``diff/change={added,removed,changed,unchanged}/`` by id, with both decisions (``write_diff``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from manifests import io as mio
from manifests.schema import VALIDATE_FIELDS, Stage
from pipeline import joins
from manifests.config import ConfigError, PipelineConfig
from stages import embed as emb

FILL = [f.name for f in VALIDATE_FIELDS if f.name not in ("n_bytes", "sha256")] + ["stage", "reason", "detail"]
PREFIX = "_prev_"


@dataclass
class Previous:
    uri: str
    fs: object
    root: str
    summary: dict = field(repr=False)

    def path(self, *parts: str) -> str:
        return mio.join(self.root, *parts)

    def files(self, part: str) -> list[str]:
        return sorted(p for p in self.fs.find(self.path(part)) if p.endswith(".parquet"))

    def cache_root(self) -> str:
        """Its embedding cache: an explicit ``embed.cache_path``, else inside its directory."""
        explicit = ((self.summary.get("config") or {}).get("embed") or {}).get("cache_path")
        return explicit or mio.join(self.uri.rstrip("/"), "cache", "embeddings")


def load_previous(cfg: PipelineConfig) -> Previous | None:
    """The previous run of ``refresh.previous`` (a finished run), else None; a one-line
    :class:`ConfigError` when it is not a finished run or is this run's own output."""
    uri = cfg.refresh.previous
    if not uri:
        return None
    try:
        fs, root = mio.filesystem(uri, cfg.storage)
        finished = all(mio.is_committed(fs, mio.join(root, p)) for p in ("", "curated", "rejected"))
    except Exception as e:  # noqa: BLE001 - any reachability problem is one line
        raise ConfigError(f"refresh error: cannot reach refresh.previous {uri}: {type(e).__name__}") from None
    if not finished:
        raise ConfigError(f"refresh error: refresh.previous {uri} is not a finished run "
                          "(no _SUCCESS on it, its curated/ and rejected/)")
    out_fs, out_root = mio.filesystem(cfg.output, cfg.storage)
    if mio.to_uri(out_fs, out_root).rstrip("/") == mio.to_uri(fs, root).rstrip("/"):
        raise ConfigError("refresh error: output is the previous run's directory; a refresh writes a new one "
                          "(the previous manifest is never modified)")
    with fs.open(mio.join(root, "summary.json"), "rb") as f:
        summary = json.loads(f.read())
    return Previous(uri, fs, root, summary)


def with_previous_cache(cfg: PipelineConfig, prev: Previous | None) -> PipelineConfig:
    """``cfg`` reading the previous run's embedding cache too."""
    if prev is None or not cfg.embed.cache:
        return cfg
    extra = [*cfg.embed.read_caches, prev.cache_root()]
    return cfg.model_copy(update={"embed": cfg.embed.model_copy(update={"read_caches": extra})})


# --------------------------------------------------------------------------- previous rows

def _normalize(batch: pa.Table, status: str) -> pa.Table:
    """Previous manifest rows as id, uri, sha256, status, stage, reason + the validate columns."""
    n = len(batch)
    cols = {"id": batch["id"], "uri": batch["uri"], "status": pa.array([status] * n, pa.string())}
    for f in VALIDATE_FIELDS:
        cols[f.name] = batch[f.name].cast(f.type) if f.name in batch.column_names else pa.nulls(n, f.type)
    for c in ("stage", "reason", "detail"):
        cols[c] = batch[c].cast(pa.string()) if c in batch.column_names else pa.nulls(n, pa.string())
    return pa.table(cols)


def previous_rows(prev: Previous) -> ray.data.Dataset:
    afs = mio.arrow_filesystem(prev.fs)
    parts = []
    for part in ("curated", "rejected"):
        files = prev.files(part)
        if files:
            parts.append(ray.data.read_parquet(files, filesystem=afs).map_batches(
                _normalize, batch_format="pyarrow", fn_kwargs={"status": part}))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _validated(batch: pa.Table) -> pa.Table:
    """Rows the previous run validated (it has their sha256 and they were not rejected before validation)."""
    stage = batch["stage"].to_pylist()
    ok = [s is None or s not in (Stage.INGEST.value, Stage.SELECT.value) for s in stage]
    rows = batch.filter(pc.and_(pa.array(ok), pc.is_valid(batch["sha256"])))
    reject = [s == Stage.VALIDATE.value for s in rows["stage"].to_pylist()]
    out = {"sha256": rows["sha256"]}
    for c in FILL:
        col = rows[c]
        if c in ("stage", "reason", "detail"):  # later stages' decisions are made again
            col = pc.if_else(pa.array(reject, pa.bool_()), col, pa.nulls(len(rows), pa.string()))
        out[PREFIX + c] = col
    return pa.table(out)


def _kept(batch: pa.Table) -> pa.Table:
    """sha256 of the rows the previous run kept through near-duplicate removal."""
    status, reason = batch["status"].to_pylist(), batch["reason"].to_pylist()
    keep = [s == "curated" or r == "not_sampled" for s, r in zip(status, reason)]
    rows = batch.filter(pc.and_(pa.array(keep), pc.is_valid(batch["sha256"])))
    return pa.table({"key": emb.key_array(emb.cache_keys(rows["sha256"].to_pylist()))})


def _keys(batch: pa.Table, rejected: bool) -> pa.Table:
    """Keys of the previously validated rows that passed validation (or were rejected by it)."""
    was_rejected = pc.is_valid(batch[PREFIX + "reason"])
    rows = batch.filter(was_rejected if rejected else pc.invert(was_rejected))
    return pa.table({"key": emb.key_array(emb.cache_keys(rows["sha256"].to_pylist()))})


def _unique_keys(ds: ray.data.Dataset) -> np.ndarray:
    got = [np.asarray(b["key"], dtype="S16") for b in ds.iter_batches(batch_format="numpy", batch_size=None)
           if len(b["key"])]
    return np.unique(np.concatenate(got)) if got else np.zeros(0, dtype="S16")


def refresh_fingerprint(cfg: PipelineConfig, prev: Previous | None) -> str:
    """What a refresh depends on: the previous run (its fingerprints, when it finished)."""
    if prev is None:
        return ""
    from pipeline.stage import fingerprint

    return fingerprint({"refresh": cfg.section("refresh"), "previous": prev.summary.get("fingerprints"),
                        "finished": (prev.summary.get("timings_s") or {}).get("total")}, "")


def validate_fingerprint_matches(prev: Previous, current: str) -> bool:
    return prev.summary.get("validate_fingerprint") == current


@dataclass
class Reuse:
    """What the streaming pass may copy: ``keys`` (sorted S16 sha256 keys it skips decoding)
    and ``fill`` (previous validate columns by sha256, ``_prev_*`` names; several rows of
    one sha256 carry the same values, the first is used)."""

    keys: np.ndarray
    fill: ray.data.Dataset


def reuse_plan(prev: Previous, known: dict[str, np.ndarray]) -> Reuse:
    """Images to skip: validated before, and with an embedding cached for every model."""
    validated = previous_rows(prev).map_batches(_validated, batch_format="pyarrow").materialize()
    keys = _unique_keys(validated.map_batches(_keys, batch_format="pyarrow", fn_kwargs={"rejected": False}))
    for k in known.values():  # an image without a cached embedding is decoded for the model
        keys = np.intersect1d(keys, k)
    rejected = _unique_keys(validated.map_batches(_keys, batch_format="pyarrow", fn_kwargs={"rejected": True}))
    keys = np.union1d(keys, rejected)  # a validate reject needs no embedding
    return Reuse(keys, validated)


def _reused(batch: pa.Table) -> pa.Table:
    return batch.filter(batch["_reused"])


def _fresh(batch: pa.Table) -> pa.Table:
    return batch.filter(pc.invert(batch["_reused"])).drop_columns(["_reused"])


def _restore(batch: pa.Table) -> pa.Table:
    """Reused rows joined with the previous validate columns: copy them in place."""
    for c in FILL:
        batch = batch.set_column(batch.column_names.index(c), c, batch[PREFIX + c].cast(batch.schema.field(c).type))
    return batch.drop_columns([PREFIX + c for c in FILL] + ["_reused"])


def _count_reused(batch: pa.Table) -> pa.Table:
    return pa.table({"n": [pc.sum(batch["_reused"].cast(pa.int64())).as_py() or 0]})


def fill_reused(passed: ray.data.Dataset, reuse: Reuse, broadcast_mb: float) -> tuple[ray.data.Dataset, int]:
    """The streaming pass output (``_reused`` marks rows not decoded) with the previous run's
    validate columns on its reused rows; and how many there were."""
    n = int(sum(r["n"] for r in passed.map_batches(_count_reused, batch_format="pyarrow").take_all()))
    fresh = passed.map_batches(_fresh, batch_format="pyarrow")
    if n == 0:
        return fresh, 0
    reused = joins.join(passed.map_batches(_reused, batch_format="pyarrow"), reuse.fill, "sha256", "left_outer",
                        broadcast_mb, rows_hint=n, unique=True)
    return fresh.union(reused.map_batches(_restore, batch_format="pyarrow")), n


def prior_keys(prev: Previous) -> np.ndarray:
    """Sorted keys of the images the previous run kept through near-duplicate removal."""
    return _unique_keys(previous_rows(prev).map_batches(_kept, batch_format="pyarrow"))


# --------------------------------------------------------------------------- sampling

def previous_levels(cfg: PipelineConfig, prev: Previous, model_id: str) -> tuple[list[dict] | None, str]:
    """The previous run's fitted levels (centroids and parents) when they can be reused,
    else None; and why."""
    name = next((n for n in ("sample.centroids", "sample_centroids")  # (older runs)
                 if mio.is_committed(prev.fs, prev.path("stages", n))), "sample.centroids")
    marker = mio.read_marker(prev.fs, prev.path("stages", name))
    if not cfg.refresh.reuse_centroids:
        return None, "refresh.reuse_centroids is off"
    if not marker:
        return None, "the previous run has no sampling centroids"
    if marker.get("model_id") != model_id:
        return None, f"the previous centroids are of model {marker.get('model_id')}, this run samples on {model_id}"
    import pyarrow.dataset as pads

    table = pads.dataset(prev.files(f"stages/{name}"), filesystem=mio.arrow_filesystem(prev.fs),
                         format="parquet").to_table().sort_by([("level", "ascending"), ("cluster", "ascending")])
    levels = []
    for li in sorted(set(table["level"].to_pylist())):
        t = table.filter(pc.equal(table["level"], li))
        dim = t["centroid"].type.list_size
        cent = np.asarray(t["centroid"].combine_chunks().flatten(), dtype=np.float32).reshape(-1, dim)
        levels.append({"centroids": cent, "up": np.asarray(t["parent"], dtype=np.int64), "inertia": float("nan")})
    levels[-1]["up"] = None
    if cfg.sample.levels and [len(lv["centroids"]) for lv in levels] != list(cfg.sample.levels):
        return None, (f"sample.levels {list(cfg.sample.levels)} differ from the previous run's "
                      f"{[len(lv['centroids']) for lv in levels]}")
    return levels, "reused"


# --------------------------------------------------------------------------- diff

def _status(batch: pa.Table) -> pa.Table:
    n = len(batch)
    reason = batch["reason"] if "reason" in batch.column_names else pa.nulls(n, pa.string())
    status = pc.if_else(pc.is_valid(reason), pa.scalar("rejected"), pa.scalar("curated"))
    return pa.table({"id": batch["id"], "uri": batch["uri"], "sha256": batch["sha256"].cast(pa.string()),
                     "status": status, "reason": reason.cast(pa.string())})


def _prefixed(batch: pa.Table) -> pa.Table:
    return pa.table({"id": batch["id"], "prev_uri": batch["uri"], "prev_sha256": batch["sha256"],
                     "previous_status": batch["status"], "previous_reason": batch["reason"]})


def _classify(batch: pa.Table) -> pa.Table:
    cur, old = batch["status"].to_pylist(), batch["previous_status"].to_pylist()
    sha, prev_sha = batch["sha256"].to_pylist(), batch["prev_sha256"].to_pylist()
    kind = ["added" if o is None else "removed" if c is None else "unchanged" if s == p else "changed"
            for c, o, s, p in zip(cur, old, sha, prev_sha)]
    uri = pc.coalesce(batch["uri"], batch["prev_uri"])
    return pa.table({"id": batch["id"], "uri": uri, "change": pa.array(kind, pa.string()),
                     "status": batch["status"], "reason": batch["reason"],
                     "previous_status": batch["previous_status"], "previous_reason": batch["previous_reason"],
                     "sha256": batch["sha256"], "previous_sha256": batch["prev_sha256"]})


def _absent(batch: pa.Table, ids) -> pa.Table:
    """Previous rows whose id is not in ``ids`` (a broadcast table of the current ids), in
    the columns of the current-to-previous join (current side null)."""
    ids = joins.resolve_ref(ids)
    gone = batch.filter(pc.invert(pc.is_in(batch["id"], value_set=ids["id"].combine_chunks())))
    n = len(gone)
    cols = {"id": gone["id"], **{c: pa.nulls(n, pa.string()) for c in ("uri", "sha256", "status", "reason")}}
    return pa.table({**cols, **{c: gone[c].cast(pa.string()) for c in gone.column_names if c != "id"}})


def write_diff(rd, decided: ray.data.Dataset, prev: Previous) -> dict:
    """``diff/change=<kind>/`` parquet (id, uri, status/reason now and before, both
    sha256) for added, removed, changed (same id, new content) and unchanged ids, written
    in one pass (partitioned by ``change``); returns the counts.

    A full outer join by id; when both id lists fit ``run.broadcast_join_mb``, it is two
    maps instead of a shuffle: current rows look their previous row up, and previous rows
    whose id is gone are the removed ones."""
    now = decided.map_batches(_status, batch_format="pyarrow")
    before = (previous_rows(prev).map_batches(_status, batch_format="pyarrow")
              .map_batches(_prefixed, batch_format="pyarrow")).materialize()
    limit = int(rd.cfg.run.broadcast_join_mb * 2**20)
    small_before = joins.collect_small(before, limit)
    now_ids = joins.collect_small(now.select_columns(["id"]), limit) if small_before is not None else None
    if now_ids is not None:
        joined = joins.join(now, small_before, "id", "left_outer", rd.cfg.run.broadcast_join_mb).union(
            before.map_batches(_absent, batch_format="pyarrow", fn_kwargs={"ids": ray.put(now_ids)}))
    else:
        joined = now.join(before, join_type="full_outer", on=("id",),
                          num_partitions=joins.shuffle_partitions(now.count()))
    joined = joined.map_batches(_classify, batch_format="pyarrow")
    final = rd.path("diff")
    tmp = mio.temp_path(rd.fs, final)
    rd.fs.makedirs(tmp, exist_ok=True)
    joined.write_parquet(tmp, filesystem=rd.afs, partition_cols=["change"])
    counts = {"added": 0, "removed": 0, "changed": 0, "unchanged": 0}
    import pyarrow.parquet as pq

    rd.fs.invalidate_cache(tmp)
    for path in rd.fs.find(tmp):
        if path.endswith(".parquet"):
            kind = next(p.split("=", 1)[1] for p in path.split("/") if p.startswith("change="))
            with rd.fs.open(path, "rb") as f:
                counts[kind] += pq.ParquetFile(f).metadata.num_rows
    mio.commit(rd.fs, tmp, final, {"counts": counts})
    return counts
