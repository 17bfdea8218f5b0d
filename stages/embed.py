"""The embedding stage: one decode feeds every backbone; models run in actors.

CPU side (inside the validate task, so an image is decoded once for the whole pipeline):
validate decodes each JPEG at the smallest libjpeg DCT scale whose short side covers the
largest model input (``cover``), applies EXIF orientation, and hands the decode here.
:func:`add_model_inputs` makes each model's input from that decode exactly as Birder's
``inference_preset(size, rgb_stats, center_crop=1.0)`` does: the whole image resized to
(size, size) -- a squash, no aspect-preserving crop -- bicubic with antialiasing
(``stages.backbones.model_input``). Inputs travel as uint8 ``fixed_size_binary`` columns,
one per distinct size (two 224-px models share one), plus a per-model ``need`` mask: rows
whose embedding is already in the cache are not sent to the model.

Model side (:class:`EmbedModels`, a callable class for ``map_batches``; the plan gives it
``num_gpus``/``num_cpus``, ``concurrency`` and ``batch_size``): every model is loaded once
per actor; normalization runs on the device; embeddings come back as Arrow
``fixed_size_list<float16|float32>`` columns ``emb_<model>`` (null where not computed) and
the pixel columns are dropped, so nothing with pixels is ever written.

After the pass, :func:`resolve_group` (run per sha256 group by the plan) gives every row
its embedding -- just computed, or from the cache -- and marks which new ones to add to the
cache, keyed by (sha256, model id, preprocessing signature).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.backbones import BackboneSpec, model_input

PREP_VERSION = 1  # bump when model_input or the decode that feeds it changes


def slug(name: str) -> str:
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def emb_column(name: str) -> str:
    return f"emb_{slug(name)}"


def need_column(name: str) -> str:
    return f"_need_{slug(name)}"


def pixels_column(size: int) -> str:
    return f"_px_{size}"


def prep_signature(s: BackboneSpec, flip: bool = False) -> str:
    """What the model sees, as a short hash: decode, orientation, resize, normalization
    (and the horizontal mirror, for a flip plan)."""
    what = {"v": PREP_VERSION, "decode": "libjpeg-dct-cover+exif", "resize": "squash-pil-bicubic-aa",
            "size": s.size, "output": s.output, "l2": s.l2_normalize}
    if flip:
        what["mirror"] = "horizontal"
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class ModelPlan:
    """Everything an actor or a CPU task needs about one model (plain, picklable data)."""

    spec: BackboneSpec
    weights: str | None  # local path or s3:// URI, resolved by the driver
    model_id: str  # name@weights-identity
    prep: str  # prep_signature(spec, flip)
    dtype: str = "float16"
    flip: bool = False  # the model sees each image mirrored left-right (near_dedup.flip)

    @property
    def name(self) -> str:
        return self.spec.name + ("_flip" if self.flip else "")

    @property
    def column(self) -> str:
        return emb_column(self.name)

    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.float16() if self.dtype == "float16" else pa.float32(), self.spec.dim)


def cover_size(plans: list[ModelPlan]) -> int:
    """The short side a decode must reach to feed every model."""
    return max((p.spec.size for p in plans), default=0)


# --------------------------------------------------------------------------- cache keys

def cache_keys(sha_hex: list[str | None]) -> np.ndarray:
    """16-byte keys (the first half of each sha256) as a numpy ``S16`` array."""
    return np.array([bytes.fromhex(h[:32]) if h else b"" for h in sha_hex], dtype="S16")


def key_array(keys: np.ndarray) -> pa.Array:
    """``S16`` keys as an Arrow ``binary(16)`` column, from their fixed-width buffer (going
    through Python bytes would lose trailing NUL bytes: numpy strips them)."""
    keys = np.ascontiguousarray(keys, dtype="S16")
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(16), len(keys), [None, pa.py_buffer(keys.tobytes())])


def known_set(sha_hex: list[str]) -> np.ndarray:
    """Sorted unique keys of the images a cache holds (for :func:`is_known`)."""
    return np.unique(cache_keys(sha_hex))


def is_known(known: np.ndarray | None, sha_hex: list[str | None]) -> np.ndarray:
    if known is None or len(known) == 0 or not sha_hex:
        return np.zeros(len(sha_hex), dtype=bool)
    keys = cache_keys(sha_hex)
    pos = np.searchsorted(known, keys).clip(0, len(known) - 1)
    return (known[pos] == keys) & np.array([h is not None for h in sha_hex])


# --------------------------------------------------------------------------- CPU side

def add_model_inputs(table: pa.Table, decodes: list[np.ndarray | None], plans: list[ModelPlan],
                     known: dict[str, np.ndarray] | None = None) -> pa.Table:
    """Append the model input columns for the rows of ``table`` (aligned with ``decodes``,
    None for rows that were rejected): ``_px_<size>`` uint8 (size*size*3) and a
    ``_need_<model>`` mask per model (False when the embedding is cached)."""
    known = known or {}
    sha = table.column("sha256").to_pylist()
    alive = np.array([d is not None for d in decodes], dtype=bool)
    needs = {p.name: alive & ~is_known(known.get(p.name), sha) for p in plans}
    for size in sorted({p.spec.size for p in plans}):
        wanted = np.zeros(len(decodes), dtype=bool)
        for p in plans:
            if p.spec.size == size:
                wanted |= needs[p.name]
        values = [model_input(decodes[i], size).tobytes() if wanted[i] else None for i in range(len(decodes))]
        table = table.append_column(pixels_column(size), pa.array(values, pa.binary(size * size * 3)))
    for p in plans:
        table = table.append_column(need_column(p.name), pa.array(needs[p.name], pa.bool_()))
    return table


def pixels(column: pa.ChunkedArray | pa.Array, mask: np.ndarray, size: int) -> np.ndarray:
    """The (n, size, size, 3) uint8 images of the rows selected by ``mask`` (one copy)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    arr = arr.filter(pa.array(mask))
    if len(arr) == 0:
        return np.zeros((0, size, size, 3), dtype=np.uint8)
    arr = pc.fill_null(arr, b"\0" * (size * size * 3)) if arr.null_count else arr
    nbytes = size * size * 3
    buf = np.frombuffer(arr.buffers()[1], dtype=np.uint8, count=len(arr) * nbytes, offset=arr.offset * nbytes)
    return buf.reshape(len(arr), size, size, 3)


def embedding_array(values: np.ndarray, mask: np.ndarray, plan: ModelPlan) -> pa.Array:
    """A ``fixed_size_list`` column of ``len(mask)`` rows: ``values`` (n_true x dim) at the
    rows where ``mask`` is True, null elsewhere."""
    n, dim = len(mask), plan.spec.dim
    np_type = np.float16 if plan.dtype == "float16" else np.float32
    full = np.zeros((n, dim), dtype=np_type)
    full[mask] = values.astype(np_type)
    flat = pa.array(full.reshape(-1), type=pa.float16() if plan.dtype == "float16" else pa.float32())
    return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~mask))


# --------------------------------------------------------------------------- model side

@dataclass
class EmbedModels:
    """Callable class for ``map_batches``: runs every model of ``plans`` on its rows.

    Columns in: ``_px_<size>`` and ``_need_<model>`` from :func:`add_model_inputs`. Out:
    the same rows without them, plus ``emb_<model>`` per model. ``calls`` counts the images
    given to each model (also visible as the non-null count of its column)."""

    plans: list[ModelPlan]
    device: str = "cpu"
    batch_size: int = 64
    num_threads: int | None = None
    compile: bool = False
    models_dir: str | None = None
    storage: object = None
    random_init: bool = False  # tests only: real architectures, seeded random weights
    cache_dirs: dict[str, str] = field(default_factory=dict)  # model name -> cache folder (local or s3://)
    calls: dict[str, int] = field(default_factory=dict)

    def __post_init__(self):
        import torch

        from stages.backbones import load_backbone

        if self.num_threads and self.device == "cpu":
            torch.set_num_threads(self.num_threads)
        self.models = {}
        loaded = {}  # one network per model: a flip plan shares its model's
        for p in self.plans:
            if p.spec.name in loaded:
                self.models[p.name] = loaded[p.spec.name]
                self.calls[p.name] = 0
                continue
            if self.random_init:
                torch.manual_seed(0)
            bb = load_backbone(p.spec, weights=p.weights, models_dir=self.models_dir, device=self.device,
                               random_init=self.random_init, storage=self.storage)
            bb.check_dim()  # a wrong dimension fails here, once, not on the first batch
            if self.compile:
                bb.compile()
            self.models[p.name] = loaded[p.spec.name] = bb
            self.calls[p.name] = 0

    def embed(self, plan: ModelPlan, images: np.ndarray) -> np.ndarray:
        """(n, size, size, 3) uint8 -> (n, dim) float32, in model calls of exactly
        ``batch_size`` images: the last chunk is padded with blank images. Every call has
        the same shape, so the kernels (and their summation order) are the same whatever
        rows a block holds: an image's embedding does not depend on its batch mates, and a
        rerun with other block sizes, concurrency or cache contents gives identical bits."""
        import torch

        bb = self.models[plan.name]
        out = []
        for i in range(0, len(images), self.batch_size):
            chunk = images[i : i + self.batch_size]
            n = len(chunk)
            if n < self.batch_size:
                chunk = np.concatenate([chunk, np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)])
            if plan.flip:
                chunk = chunk[:, :, ::-1]  # (n, h, w, 3): mirror left-right
            x = torch.from_numpy(np.ascontiguousarray(chunk))
            if bb.device.type == "cuda":
                x = x.pin_memory()
            out.append(bb(x)[:n].cpu().numpy())
        self.calls[plan.name] += len(images)
        return np.concatenate(out) if out else np.zeros((0, plan.spec.dim), dtype=np.float32)

    def __call__(self, batch: pa.Table) -> pa.Table:
        for p in self.plans:
            mask = np.asarray(batch.column(need_column(p.name)).to_numpy(zero_copy_only=False), dtype=bool)
            images = pixels(batch.column(pixels_column(p.spec.size)), mask, p.spec.size)
            batch = batch.append_column(p.column, embedding_array(self.embed(p, images), mask, p))
            if mask.any() and p.name in self.cache_dirs:
                self.commit_cache(p, batch.filter(pa.array(mask)))
        drop = [c for c in batch.column_names if c.startswith(("_px_", "_need_"))]
        return batch.drop_columns(drop)

    def commit_cache(self, plan: ModelPlan, rows: pa.Table) -> None:
        """Add this call's new embeddings to the cache before the call returns: the cache
        is the unit of resume, so a crash loses at most the calls in flight."""
        from manifests import io as mio

        table = pa.table({"sha256": rows.column("sha256"), "embedding": rows.column(plan.column)})
        fs, root = mio.filesystem(self.cache_dirs[plan.name], self.storage)
        mio.write_table_atomic(fs, mio.join(root, f"blk-{uuid.uuid4().hex}.parquet"), table)


def without_model_inputs(batch: pa.Table) -> pa.Table:
    """Drop pixel and mask columns (the model stage was skipped: e.g. ``--until validate``)."""
    return batch.drop_columns([c for c in batch.column_names if c.startswith(("_px_", "_need_"))])


# --------------------------------------------------------------------------- after the pass

RESOLVED_FIELDS = ("id", "sha256", "embedding", "computed", "cache_new")


def resolve_group(group: pa.Table, plan: ModelPlan) -> pa.Table:
    """One sha256 group: run rows (``id`` set; ``embedding`` set when computed this run)
    and cache rows (``id`` null). Every run row gets an embedding -- its own, else another
    computed copy's, else the cache's; the first computed row of a sha256 the cache lacks
    is marked ``cache_new``. A run row with no embedding anywhere keeps a null (the plan
    fails the run on it: the cache lost an entry while the run was going)."""
    ids = group.column("id").to_pylist()
    emb = group.column("embedding")
    run_rows = [i for i, x in enumerate(ids) if x is not None]
    cached = [i for i, x in enumerate(ids) if x is None and emb[i].is_valid]
    computed = [i for i in run_rows if emb[i].is_valid]
    source = cached[0] if cached else (computed[0] if computed else None)
    take, is_computed, is_new = [], [], []
    for i in run_rows:
        own = emb[i].is_valid
        take.append(i if own else (source if source is not None else i))
        is_computed.append(own)
        is_new.append(own and not cached and i == computed[0])
    out_emb = emb.take(pa.array(take, pa.int64())) if take else emb.slice(0, 0)
    return pa.table({
        "id": pa.array([ids[i] for i in run_rows], pa.string()),
        "sha256": group.column("sha256").take(pa.array(run_rows, pa.int64())),
        "embedding": out_emb,
        "computed": pa.array(is_computed, pa.bool_()),
        "cache_new": pa.array(is_new, pa.bool_()),
    })
