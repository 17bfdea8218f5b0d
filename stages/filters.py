"""Filter decisions on the narrow table: thresholds on per-row scores computed in the
decode pass (technical quality now; the example-based classifier and the aesthetic score
join here). A per-row step, after exact deduplication, so that a byte-identical placeholder
is reported as such rather than as one uniform image.

The first failing check decides the reason, in this order: uniform, blurry, underexposed,
overexposed, low_contrast, letterbox; ``detail`` gives the score and the threshold.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from manifests.config import QualityConfig
from manifests.rejects import reject
from manifests.schema import Reason, Stage

# (config field, score column, reject when the score is "below"/"above" the threshold, reason)
CHECKS = (
    ("min_entropy", "q_entropy", "below", Reason.UNIFORM),
    ("min_blur", "q_blur", "below", Reason.BLURRY),
    ("max_dark_clip", "q_dark_clip", "above", Reason.UNDEREXPOSED),
    ("max_bright_clip", "q_bright_clip", "above", Reason.OVEREXPOSED),
    ("min_contrast", "q_contrast", "below", Reason.LOW_CONTRAST),
    ("max_border", "q_border", "above", Reason.LETTERBOX),
)


def quality_decisions(batch: pa.Table, cfg: QualityConfig) -> pa.Table:
    """Reject the alive rows of ``batch`` that fail a configured quality threshold.

    Columns in: the q_* scores and stage/reason/detail. Rows rejected earlier, and rows
    without scores (never decoded), pass through unchanged."""
    for field, column, side, why in CHECKS:
        threshold = getattr(cfg, field)
        if threshold is None or column not in batch.column_names:
            continue
        scores = batch[column].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
        with np.errstate(invalid="ignore"):
            fails = scores < threshold if side == "below" else scores > threshold
        op = "<" if side == "below" else ">"
        detail = [f"{column} {v:.4g} {op} {field} {threshold:g}" if f else None for v, f in zip(scores, fails)]
        batch = reject(batch, fails, Stage.FILTER, why, detail)
    return batch


def embedding_matrix(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 embeddings of a fixed_size_list column (zeros where null) and the
    mask of rows that have one."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = ~np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    dim = arr.type.list_size
    out = np.zeros((len(arr), dim), dtype=np.float32)
    if valid.any():
        values = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False)
        out[valid] = values.astype(np.float32).reshape(-1, dim)
    return out, valid


def nonnatural_scores(x: np.ndarray, model: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """Per row: score, category index, margin to that category's threshold (< 0: rejected),
    and a detail per row.

    min_distance: score = max cosine similarity to an unwanted example; the category is the
    one whose threshold the row is deepest inside (or nearest to); margin = distance -
    threshold (one threshold for all categories since it comes from cross-validation).
    probe: score = p(unwanted) = 1 - p(natural), the category the most probable unwanted
    class; margin = threshold - p(unwanted)."""
    from stages.kernels.examples import min_cosine_distance, normalize

    cats = model["categories"]
    if model["method"] == "min_distance":
        dist = np.stack([min_cosine_distance(x, model["bank"][c]) for c in cats], axis=1)
        thr = np.array([model["thresholds"][c] for c in cats], dtype=np.float32)
        margin = dist - thr  # < 0: inside the category's threshold
        best = margin.argmin(axis=1)
        rows = np.arange(len(x))
        score = 1.0 - dist.min(axis=1)
        detail = [f"min cosine distance {dist[i, best[i]]:.4f} to '{cats[best[i]]}' examples < threshold "
                  f"{thr[best[i]]:.4f}" for i in rows]
        return score, best, margin[rows, best], detail
    logits = normalize(x) @ model["weight"] + model["bias"]
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    idx = [model["classes"].index(c) for c in cats]
    best = p[:, idx].argmax(axis=1)
    score = 1.0 - p[:, model["classes"].index("natural")]  # p(unwanted): any unwanted class
    detail = [f"p(unwanted) {s:.4f} > threshold {model['threshold']:.4f}, most likely '{cats[b]}'"
              for b, s in zip(best, score)]
    return score, best, model["threshold"] - score, detail


def nonnatural_decisions(batch: pa.Table, model: dict) -> pa.Table:
    """Score every row that has an ``embedding`` (the filter model's, joined by id), reject
    the alive ones inside an unwanted category's threshold, drop the embedding.

    Adds ``nonnatural_score`` (float32), ``nonnatural_category`` (the nearest unwanted
    category, set on every scored row so a user can audit near misses) and
    ``nonnatural_margin`` (signed distance to that category's threshold, < 0: rejected;
    ``biocurate examples-report`` shows the images nearest 0)."""
    x, valid = embedding_matrix(batch["embedding"])
    n = len(batch)
    score = np.full(n, np.nan, dtype=np.float32)
    margin = np.full(n, np.nan, dtype=np.float32)
    category: list[str | None] = [None] * n
    detail: list[str | None] = [None] * n
    inside = np.zeros(n, dtype=bool)  # inside a category's threshold (on the unrounded margin)
    if valid.any():
        s, best, m, why = nonnatural_scores(x[valid], model)
        rows = np.flatnonzero(valid)
        score[rows], margin[rows], inside[rows] = s, m, np.asarray(m) < 0
        for j, i in enumerate(rows):
            category[i] = model["categories"][best[j]]
            detail[i] = why[j]
    out = reject(batch.drop_columns(["embedding"]), inside, Stage.FILTER, Reason.NONNATURAL, detail)
    return (out.append_column("nonnatural_score", pa.array(score, pa.float32(), mask=~valid))
            .append_column("nonnatural_category", pa.array(category, pa.string()))
            .append_column("nonnatural_margin", pa.array(margin, pa.float32(), mask=~valid)))


_HEADS: dict = {}


def aesthetic_decisions(batch: pa.Table, head: str, weights: str | None, min_score: float | None) -> pa.Table:
    """LAION aesthetic score of every row with an ``embedding`` (the aesthetic model's, joined
    by id); alive rows below ``min_score`` are rejected ``low_aesthetic``. Adds ``aesthetic``."""
    from stages.aesthetic import load_head, score

    key = (head, weights)
    if key not in _HEADS:  # once per worker process
        _HEADS[key] = load_head(head, weights)
    x, valid = embedding_matrix(batch["embedding"])
    values = np.full(len(batch), np.nan, dtype=np.float32)
    if valid.any():
        values[valid] = score(_HEADS[key], x[valid])
    out = batch.drop_columns(["embedding"])
    if min_score is not None:
        with np.errstate(invalid="ignore"):
            low = valid & (values < min_score)
        detail = [f"aesthetic {v:.3f} < min_score {min_score:g}" if f else None for v, f in zip(values, low)]
        out = reject(out, low, Stage.FILTER, Reason.LOW_AESTHETIC, detail)
    return out.append_column("aesthetic", pa.array(values, pa.float32(), mask=~valid))
