"""Diversity sampling, per-batch and per-group functions (Arrow in, Arrow out) that
``pipeline.stages.sample`` runs on Ray Data; the algorithms are in ``stages.kernels.sampling``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from manifests.rejects import reject
from manifests.schema import Reason, Stage
from stages.filters import embedding_matrix
from stages.kernels import near_dedup as kn
from stages.kernels import sampling as ks
from stages.kernels.hashing import seeded_rank


def level_columns(levels: int) -> list[str]:
    return [f"cluster_l{i + 1}" for i in range(levels)]


class AssignLevels:
    """Callable for ``map_batches``: each row's cluster at every level (nearest level-1
    centroid, then the parents), its cosine to the leaf centroid, its hash(seed, id) rank
    and its taxon partition. On a GPU the screen products run there."""

    def __init__(self, levels: list[dict], seed: int, taxon: str | None, parts: int, device: str = "cpu"):
        import torch

        self.levels, self.seed, self.taxon, self.parts = levels, seed, taxon, parts
        self.device = torch.device(device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        x, valid = embedding_matrix(batch["embedding"])
        batch = batch.filter(pa.array(valid))
        leaf, sim = ks.assign(x[valid], self.levels[0]["centroids"], device=self.device)
        cols = ks.row_levels(leaf, self.levels)
        ids = batch["id"].to_pylist()
        out = {"id": batch["id"]}
        for i, name in enumerate(level_columns(len(self.levels))):
            out[name] = pa.array(cols[:, i].astype(np.int32))
        out["_sim"] = pa.array(sim.astype(np.float32))
        out["_rank"] = pa.array(seeded_rank(self.seed, ids), pa.uint64())
        taxa = batch[self.taxon] if self.taxon else pa.nulls(len(batch), pa.string())
        out["_taxon"] = pc.cast(taxa, pa.string())
        names = [t if t is not None else "" for t in out["_taxon"].to_pylist()]
        out["_tpart"] = pa.array((kn.id_keys(names) % np.uint64(self.parts)).astype(np.int64))
        out["_lpart"] = pa.array((cols[:, 0] % self.parts).astype(np.int64))
        return pa.table(out)


def taxon_flags(group: pa.Table, cap: int | None, minimum: int | None) -> pa.Table:
    """``_eligible`` (within the per-taxon cap) and ``_reserved`` (within the per-taxon
    minimum) for rows holding every row of their taxa (a hash partition on the taxon)."""
    if len(group) == 0:
        return group.append_column("_eligible", pa.array([], pa.bool_())).append_column(
            "_reserved", pa.array([], pa.bool_()))
    taxa = group["_taxon"].to_pylist()
    known = sorted({t for t in taxa if t})
    code = {t: i for i, t in enumerate(known)}
    codes = np.array([code[t] if t else -1 for t in taxa], dtype=np.int64)
    eligible, reserved = ks.taxon_quota(codes, group["cluster_l1"].to_numpy(), group["_rank"].to_numpy(),
                                        cap, minimum)
    return group.append_column("_eligible", pa.array(eligible)).append_column("_reserved", pa.array(reserved))


def leaf_counts(batch: pa.Table, k: int) -> pa.Table:
    """Per leaf cluster: rows, eligible rows, reserved rows (one row of three lists)."""
    leaf = batch["cluster_l1"].to_numpy().astype(np.int64)
    eligible = batch["_eligible"].to_numpy(zero_copy_only=False) if "_eligible" in batch.column_names \
        else np.ones(len(leaf), bool)
    reserved = batch["_reserved"].to_numpy(zero_copy_only=False) if "_reserved" in batch.column_names \
        else np.zeros(len(leaf), bool)
    return pa.table({"rows": [np.bincount(leaf, minlength=k).tolist()],
                     "eligible": [np.bincount(leaf[eligible], minlength=k).tolist()],
                     "reserved": [np.bincount(leaf[reserved], minlength=k).tolist()]})


def pick_rows(group: pa.Table, alloc: np.ndarray, eligible_counts: np.ndarray, pick: str,
              levels: int) -> pa.Table:
    """The decision of every row of a set of whole leaf clusters: ``_sampled`` and, for the
    others, the detail of a ``not_sampled`` reject. ``alloc``, ``eligible_counts``: per
    leaf cluster (arrays; the plan resolves its object refs before the call)."""
    cols = level_columns(levels)
    if len(group) == 0:
        return pa.table({"id": pa.array([], pa.string()), **{c: pa.array([], pa.int32()) for c in cols},
                         "_sampled": pa.array([], pa.bool_()), "_sdetail": pa.array([], pa.string())})
    leaf = group["cluster_l1"].to_numpy().astype(np.int64)
    n = len(leaf)
    eligible = group["_eligible"].to_numpy(zero_copy_only=False) if "_eligible" in group.column_names \
        else np.ones(n, bool)
    reserved = group["_reserved"].to_numpy(zero_copy_only=False) if "_reserved" in group.column_names \
        else np.zeros(n, bool)
    key = (-group["_sim"].to_numpy().astype(np.float64) if pick == "closest"
           else group["_rank"].to_numpy().astype(np.uint64))
    chosen = ks.pick(leaf, key, eligible, reserved, alloc)
    detail = [None if c else (f"leaf cluster {lf}: {alloc[lf]} of {eligible_counts[lf]} eligible rows chosen"
                              + ("" if e else "; over its taxon's cap"))
              for c, lf, e in zip(chosen.tolist(), leaf.tolist(), eligible.tolist())]
    return pa.table({"id": group["id"], **{c: group[c] for c in cols}, "_sampled": pa.array(chosen),
                     "_sdetail": pa.array(detail, pa.string())})


def apply_sample(batch: pa.Table, levels: int) -> pa.Table:
    """Rows joined (left) with the decisions: cluster ids and ``sampled`` on every row that
    was clustered; alive rows not chosen become ``not_sampled`` rejects."""
    n = len(batch)
    cols = level_columns(levels)
    if "_sampled" not in batch.column_names:
        batch = batch.append_column("_sampled", pa.nulls(n, pa.bool_())).append_column(
            "_sdetail", pa.nulls(n, pa.string()))
        for c in cols:
            batch = batch.append_column(c, pa.nulls(n, pa.int32()))
    chosen = pc.cast(batch["_sampled"], pa.bool_())  # (null-typed when nothing was clustered)
    not_chosen = np.asarray(pc.invert(chosen).fill_null(False).to_numpy(zero_copy_only=False), dtype=bool)
    out = reject(batch, not_chosen, Stage.SAMPLE, Reason.NOT_SAMPLED, batch["_sdetail"])
    out = out.drop_columns([c for c in ("_sampled", "_sdetail", *cols) if c in out.column_names])
    for c in cols:
        out = out.append_column(c, pc.cast(batch[c], pa.int32()))
    return out.append_column("sampled", batch["_sampled"])
