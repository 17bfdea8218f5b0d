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
import pyarrow.compute as pc

from manifests.schema import Reason, Stage
from pipeline.config import QualityConfig

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
    n = len(batch)
    alive = ~np.asarray(pc.is_valid(batch["reason"]).to_numpy(zero_copy_only=False), dtype=bool)
    stage = batch["stage"].to_pylist()
    reason = batch["reason"].to_pylist()
    detail = batch["detail"].to_pylist()
    for field, column, side, why in CHECKS:
        threshold = getattr(cfg, field)
        if threshold is None or column not in batch.column_names:
            continue
        scores = batch[column].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls -> nan
        with np.errstate(invalid="ignore"):
            fails = scores < threshold if side == "below" else scores > threshold
        for i in np.flatnonzero(fails & alive):
            stage[i], reason[i] = Stage.FILTER.value, why.value
            detail[i] = f"{column} {scores[i]:.4g} {'<' if side == 'below' else '>'} {field} {threshold:g}"
            alive[i] = False
    if n == 0:
        return batch
    for name, values in (("stage", stage), ("reason", reason), ("detail", detail)):
        batch = batch.set_column(batch.schema.get_field_index(name), name, pa.array(values, pa.string()))
    return batch
