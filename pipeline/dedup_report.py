"""``biocurate dedup-report``: what near-duplicate removal did around its thresholds, and
what to look at to pick them. Reads a finished run (``summary.json``, the committed
``stages/near_dedup.pairs`` table, and for labelled pairs the manifests, the dedup model's
embeddings and ``stages/near_dedup.centre``), never reruns a model, needs no Ray: one
streaming pass over the pairs table with bounded memory (histograms and a few pairs per
side of the threshold), whatever the corpus size.

Writes ``<output>/dedup_report/``:

* ``report.json`` -- thresholds, keep policy and removals (direct vs component), the
  histogram of the verified semantic pairs (found at/above the threshold and near misses
  below it) in bins of 0.01 over [threshold - report_margin, 1] and of the perceptual
  pairs' Hamming distances, the pairs nearest each side of the threshold, and, with
  ``--labels`` (``id_a,id_b,label``; label 1/0, yes/no, true/false, duplicate/distinct),
  pairwise precision and recall with 95% Wilson intervals at the run's thresholds and on
  a grid of thresholds, and the threshold with the best F1 among those of the highest
  precision;
* ``index.html`` -- the same, with the two images of each pair side by side;
* ``label_pairs.csv`` (``--label-sample N``) -- the N semantic pairs nearest each side of
  the threshold, with an empty ``label`` column to fill in and pass back as ``--labels``.

A labelled pair is scored from the run's data, whether or not a detector produced it:
cosine of the dedup model's embeddings centred by the run's mean (as near_dedup did) and
L2-normalized (with ``near_dedup.flip``, the largest over the plain and mirrored images'
embeddings of both sides), and the Hamming distance of the manifests' pHashes. At threshold
t it is predicted a duplicate when cosine >= t or Hamming <= max_hamming.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from manifests import io as mio
from pipeline import thumbs
from manifests.config import ConfigError, PipelineConfig
from stages.export import spreadsheet_safe
from stages.kernels.examples import wilson
from stages.kernels.phash import hamming64

PAIR_COLUMNS = ["group", "id_a", "id_b", "detector", "similarity", "kind"]
WIDTH = 0.01  # histogram bin and threshold grid step
GRID_BELOW = 0.1  # the threshold grid starts at least this far below the run's threshold
HAMMING_GRID = 24  # the max_hamming grid: 0 .. this (distinct photos measured >= 24 apart)
TRUE = {"1", "true", "yes", "y", "dup", "duplicate", "same", "near_duplicate", "near-duplicate"}
FALSE = {"0", "false", "no", "n", "distinct", "different", "not_duplicate", "not-duplicate", "unique"}
MAX_LISTED = 50  # disagreements and missing ids listed in the report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="biocurate dedup-report",
                                description="Report on the near-duplicate removal of a finished run: the "
                                "similarities around the threshold, and precision / recall on labelled pairs.")
    p.add_argument("--output", help="The run directory (required without --config).")
    p.add_argument("--config", help="The run's YAML config (default: the config the run recorded in summary.json; "
                   "give it for storage options).")
    p.add_argument("--labels", help="Labelled pairs: CSV with columns id_a,id_b,label (label 1/0, yes/no, "
                   "true/false, duplicate/distinct; empty: skipped).")
    p.add_argument("--per-side", type=int, default=8, metavar="K",
                   help="Pairs shown on each side of the threshold (default 8).")
    p.add_argument("--label-sample", type=int, default=0, metavar="N",
                   help="Also write label_pairs.csv: the N semantic pairs nearest each side of the threshold, "
                   "to label.")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- pure parts

def hist_edges(threshold: float, margin: float, width: float = WIDTH) -> np.ndarray:
    """Bin edges over [threshold - margin, 1], one of them the threshold itself (bins of
    ``width``; the last one may end a little past 1)."""
    below = int(round(margin / width))
    above = max(1, math.ceil((1.0 - threshold) / width - 1e-9))
    return np.round(threshold + width * np.arange(-below, above + 1), 6)


def bin_counts(values: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, int, int]:
    """(counts per bin [edges[i], edges[i+1]), count below edges[0], count past edges[-1]);
    the last bin is closed (a cosine of 1). A value equal to an edge goes to the bin it
    starts, so the threshold edge splits exactly as ``similarity >= threshold``."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    idx = np.searchsorted(edges, v, side="right") - 1
    below = int((idx < 0).sum())
    last = len(edges) - 2
    over = idx > last
    # cosines reach 1 (and a float32 rounding past it): the last bin is closed
    idx = np.where(over & (v <= edges[-1] + 1e-6), last, idx)
    above = int((idx > last).sum())
    ok = (idx >= 0) & (idx <= last)
    return np.bincount(idx[ok], minlength=last + 1).astype(np.int64), below, above


def parse_label(value: str | None) -> bool | None:
    """True (duplicates), False (distinct), None (empty: not labelled); ValueError else."""
    v = (value or "").strip().lower()
    if not v:
        return None
    if v in TRUE:
        return True
    if v in FALSE:
        return False
    raise ValueError(f"label {value!r} is not one of 1/0, yes/no, true/false, duplicate/distinct")


def read_label_rows(text: str, source: str = "labels") -> tuple[list[tuple[str, str, bool]], dict]:
    """Labelled pairs from CSV text (a header naming id_a, id_b, label, in any order and
    with other columns; or no header: the first three columns). Returns the pairs (each
    unordered pair once, ids as written) and counts of what was skipped."""
    rows = list(csv.reader(io.StringIO(text)))
    rows = [r for r in rows if any(c.strip() for c in r)]
    counts = {"rows": 0, "unlabelled": 0, "self_pairs": 0, "repeated": 0, "conflicting": 0}
    if not rows:
        return [], counts
    head = [c.strip().lower().lstrip("\ufeff") for c in rows[0]]
    if {"id_a", "id_b", "label"} <= set(head):
        ia, ib, il = head.index("id_a"), head.index("id_b"), head.index("label")
        body, first = rows[1:], 2
    else:
        if len(rows[0]) < 3:
            raise ConfigError(f"labels error: {source} needs columns id_a,id_b,label (header or first three columns)")
        try:
            parse_label(rows[0][2])
        except ValueError:
            raise ConfigError(f"labels error: {source} needs a header naming id_a, id_b and label "
                              f"(got {rows[0][:3]})") from None
        ia, ib, il, body, first = 0, 1, 2, rows, 1
    seen: dict[tuple[str, str], bool] = {}
    bad: set[tuple[str, str]] = set()
    for n, r in enumerate(body, first):
        counts["rows"] += 1
        if max(ia, ib, il) >= len(r):
            raise ConfigError(f"labels error: {source} line {n} has {len(r)} columns")
        a, b = r[ia].strip(), r[ib].strip()
        try:
            lab = parse_label(r[il])
        except ValueError as e:
            raise ConfigError(f"labels error: {source} line {n}: {e}") from None
        if lab is None or not a or not b:
            counts["unlabelled"] += 1
            continue
        if a == b:
            counts["self_pairs"] += 1
            continue
        key = (a, b) if a < b else (b, a)
        if key in seen:
            counts["repeated"] += 1
            if seen[key] != lab:
                bad.add(key)
            continue
        seen[key] = lab
    counts["conflicting"] = len(bad)
    return [(a, b, lab) for (a, b), lab in seen.items() if (a, b) not in bad], counts


def unquote_id(value: str, known) -> str:
    """An id as written by a spreadsheet-safe CSV (``'=...``) back to the id, when only
    the unquoted form is known."""
    if value in known or not value.startswith("'") or not value[1:].startswith(("=", "+", "-", "@", "\t", "\r")):
        return value
    return value[1:]


def predict(cos: np.ndarray, ham: np.ndarray, threshold: float | None, max_hamming: int | None) -> np.ndarray:
    """Predicted duplicates: cosine >= threshold (nan: no embedding) or Hamming <=
    max_hamming (-1: no pHash). None disables that detector."""
    out = np.zeros(len(cos), bool)
    if threshold is not None:
        with np.errstate(invalid="ignore"):
            out |= np.asarray(cos, np.float64) >= threshold
    if max_hamming is not None:
        h = np.asarray(ham)
        out |= (h >= 0) & (h <= max_hamming)
    return out


def _prop(k: int, n: int) -> dict:
    return {"value": k / n if n else None, "k": int(k), "n": int(n),
            "ci95": [round(x, 6) for x in wilson(int(k), int(n))] if n else None}


def metrics(pred: np.ndarray, truth: np.ndarray) -> dict:
    """Pairwise precision and recall (95% Wilson intervals), F1 and the confusion counts."""
    pred, truth = np.asarray(pred, bool), np.asarray(truth, bool)
    tp, fp = int((pred & truth).sum()), int((pred & ~truth).sum())
    fn, tn = int((~pred & truth).sum()), int((~pred & ~truth).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return {"precision": _prop(tp, tp + fp), "recall": _prop(tp, tp + fn), "f1": round(f1, 6),
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def best_threshold(rows: list[dict], key: str = "threshold") -> dict | None:
    """The grid row with the best F1 among those of the highest precision (1.0 when any
    reaches it); ties: the most conservative (highest ``threshold``; lowest
    ``max_hamming``), with the tied range. None when no threshold predicts a duplicate."""
    scored = [r for r in rows if r["precision"]["value"] is not None]
    if not scored:
        return None
    top = max(round(r["precision"]["value"], 9) for r in scored)
    best_f1 = max(r["f1"] for r in scored if round(r["precision"]["value"], 9) == top)
    tied = [r for r in scored if round(r["precision"]["value"], 9) == top and r["f1"] == best_f1]
    values = [r[key] for r in tied]
    pick = max(tied, key=lambda r: r[key]) if key == "threshold" else min(tied, key=lambda r: r[key])
    return {**pick, "tied_range": [min(values), max(values)]}


def grid(threshold: float, margin: float) -> np.ndarray:
    lo = threshold - max(margin, GRID_BELOW)
    k_lo = -int(round(max(margin, GRID_BELOW) / WIDTH))
    k_hi = max(0, math.floor((1.0 - threshold) / WIDTH + 1e-9))
    return np.round(np.clip(threshold + WIDTH * np.arange(k_lo, k_hi + 1), max(lo, -1.0), 1.0), 6)


# --------------------------------------------------------------------------- streaming pass

class _Nearest:
    """The k rows with the smallest key seen so far."""

    def __init__(self, k: int):
        self.k, self.key, self.rows = k, np.zeros(0), []

    def offer(self, key: np.ndarray, rows: list[dict]) -> None:
        if self.k <= 0 or len(key) == 0:
            return
        key = np.concatenate([self.key, np.asarray(key, np.float64)])
        rows = self.rows + rows
        keep = np.argsort(key, kind="stable")[: self.k]
        self.key, self.rows = key[keep], [rows[i] for i in keep]


def _take(batch: pa.RecordBatch, idx: np.ndarray) -> list[dict]:
    return [{c: batch.column(c)[int(i)].as_py() for c in PAIR_COLUMNS} for i in idx]


def scan_pairs(files: list[str], fs, threshold: float | None, edges: np.ndarray | None, max_hamming: int | None,
               keep: int) -> dict:
    """One pass over the pairs table: counts, the semantic histogram, the perceptual
    Hamming histogram, and the ``keep`` pairs nearest each side of the threshold (and the
    loosest perceptual matches)."""
    n_bins = len(edges) - 1 if edges is not None else 0
    sem = {"found": np.zeros(n_bins, np.int64), "near_miss": np.zeros(n_bins, np.int64)}
    outside = {"found": [0, 0], "near_miss": [0, 0]}  # below the first edge, past the last
    ham = np.zeros((max_hamming if max_hamming is not None else 0) + 1, np.int64)
    ham_over = 0
    counts: dict = {"pairs": 0, "found": {}, "near_miss": 0, "removal": {}}
    groups: set = set()
    above, below, loose = _Nearest(keep), _Nearest(keep), _Nearest(keep)
    dataset = pads.dataset(files, format="parquet", filesystem=mio.arrow_filesystem(fs))
    for batch in dataset.to_batches(columns=PAIR_COLUMNS):
        if not batch.num_rows:
            continue
        counts["pairs"] += batch.num_rows
        kind = np.array(batch.column("kind").to_pylist(), dtype=object)
        det = np.array(batch.column("detector").to_pylist(), dtype=object)
        sim = batch.column("similarity").to_numpy(zero_copy_only=False).astype(np.float64)
        for d in set(det[kind == "found"]):
            counts["found"][d] = counts["found"].get(d, 0) + int(((kind == "found") & (det == d)).sum())
        for d in set(det[kind == "removal"]):
            counts["removal"][d] = counts["removal"].get(d, 0) + int(((kind == "removal") & (det == d)).sum())
        counts["near_miss"] += int((kind == "near_miss").sum())
        found = kind == "found"
        groups.update(g for g in np.array(batch.column("group").to_pylist(), dtype=object)[found] if g is not None)
        if edges is not None:
            for k in ("found", "near_miss"):
                c, lo, hi = bin_counts(sim[(kind == k) & (det == "semantic")], edges)
                sem[k] += c
                outside[k][0] += lo
                outside[k][1] += hi
        if threshold is not None and keep:
            for side, pick, key in ((above, found & (det == "semantic") & (sim >= threshold), sim - threshold),
                                    (below, (kind == "near_miss") & (det == "semantic"), threshold - sim)):
                idx = np.flatnonzero(pick)
                if len(idx):
                    top = idx[np.argsort(key[idx], kind="stable")[:keep]]
                    side.offer(key[top], _take(batch, top))
        if max_hamming is not None:
            pick = found & (det == "perceptual")
            h = np.rint((1.0 - sim[pick]) * 64).astype(np.int64)
            ham_over += int((h > max_hamming).sum())
            ham += np.bincount(h[(h >= 0) & (h <= max_hamming)], minlength=max_hamming + 1)[: max_hamming + 1]
            idx = np.flatnonzero(pick)
            if keep and len(idx):
                top = idx[np.argsort(-h, kind="stable")[:keep]]
                loose.offer(-np.rint((1.0 - sim[top]) * 64), _take(batch, top))
    counts["groups"] = len(groups)
    hist = None
    if edges is not None:
        hist = {"edges": [float(e) for e in edges], "found": sem["found"].tolist(),
                "near_miss": sem["near_miss"].tolist(),
                "found_below_range": outside["found"][0], "near_miss_below_range": outside["near_miss"][0],
                "past_range": outside["found"][1] + outside["near_miss"][1]}
    hamming = None
    if max_hamming is not None:
        hamming = {"distance": list(range(max_hamming + 1)), "found": ham.tolist(), "past_max": ham_over}
    return {"counts": counts, "semantic": hist, "hamming": hamming,
            "above": above.rows, "below": below.rows, "loose": loose.rows}


# --------------------------------------------------------------------------- run lookups

def _files(fs, path: str) -> list[str]:
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def lookup_rows(fs, root: str, ids: set[str]) -> dict[str, dict]:
    """id -> {uri, reason, phash} from the curated and rejected manifests (only ``ids``)."""
    out: dict[str, dict] = {}
    if not ids:
        return out
    wanted = pa.array(sorted(ids), pa.string())
    for name in ("curated", "rejected"):
        path = mio.join(root, name)
        if not mio.is_committed(fs, path):
            continue
        files = _files(fs, path)
        if not files:
            continue
        ds = pads.dataset(files, format="parquet", filesystem=mio.arrow_filesystem(fs))
        cols = [c for c in ("id", "uri", "reason", "phash") if c in ds.schema.names]
        for batch in ds.to_batches(columns=cols, filter=pc.field("id").isin(wanted)):
            d = batch.to_pydict()
            for i in range(batch.num_rows):
                out[d["id"][i]] = {"id": d["id"][i], "uri": (d.get("uri") or [None] * batch.num_rows)[i],
                                   "reason": (d.get("reason") or [None] * batch.num_rows)[i],
                                   "phash": (d.get("phash") or [None] * batch.num_rows)[i]}
    return out


def _slug(name: str) -> str:  # stages.embed.slug (not imported: it imports torch)
    return re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_").lower()


def lookup_embeddings(fs, root: str, model: str, ids: set[str]) -> tuple[dict, str | None]:
    """id -> embedding (float32) of the dedup model for ``ids``; a note when the table is missing."""
    path = mio.join(root, "stages", f"embed.{_slug(model)}")
    if not mio.is_committed(fs, path):
        return {}, (f"no embeddings of {model} in the run (stages/embed.{_slug(model)}): labelled pairs scored by "
                    "pHash only")
    out: dict[str, np.ndarray] = {}
    if not ids:
        return out, None
    wanted = pa.array(sorted(ids), pa.string())
    ds = pads.dataset(_files(fs, path), format="parquet", filesystem=mio.arrow_filesystem(fs))
    for batch in ds.to_batches(columns=["id", "embedding"], filter=pc.field("id").isin(wanted)):
        for i, e in zip(batch.column("id").to_pylist(), batch.column("embedding").to_pylist()):
            if e is not None:
                out[i] = np.asarray(e, dtype=np.float32)
    return out, None


def read_centre(fs, root: str) -> tuple[np.ndarray | None, str | None]:
    path = mio.join(root, "stages", "near_dedup.centre")
    if not mio.is_committed(fs, path):
        return None, None
    t = pads.dataset(_files(fs, path), format="parquet", filesystem=mio.arrow_filesystem(fs)).to_table()
    if not len(t):
        return None, None
    return np.asarray(t["mean"][0].as_py(), dtype=np.float32), (t["model_id"][0].as_py()
                                                                 if "model_id" in t.column_names else None)


def score_pairs(pairs: list[tuple[str, str, bool]], rows: dict, vecs: dict, mean: np.ndarray | None,
                centred: bool, flips: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(cosine, Hamming) of each labelled pair: nan / -1 where a side lacks an embedding / pHash.
    With ``flips`` (near_dedup.flip: the mirrored images' embeddings) the cosine is the
    largest over the plain and mirrored images of both sides, as the run's search measured."""
    from stages.kernels.near_dedup import center_normalize

    cos = np.full(len(pairs), np.nan)
    ham = np.full(len(pairs), -1, np.int64)
    sem = [i for i, (a, b, _) in enumerate(pairs) if a in vecs and b in vecs]
    if sem and (mean is not None or not centred):
        def unit(table: dict, side: int) -> np.ndarray:
            got = [table.get(pairs[i][side]) for i in sem]
            dim = len(vecs[pairs[sem[0]][0]])
            x = center_normalize(np.stack([g if g is not None else np.zeros(dim, np.float32) for g in got]), mean)
            return np.where(np.array([g is not None for g in got])[:, None], x, np.nan)

        xa, xb = unit(vecs, 0), unit(vecs, 1)
        best = (xa * xb).sum(axis=1)
        if flips:
            fa, fb = unit(flips, 0), unit(flips, 1)
            for u, v in ((fa, xb), (xa, fb), (fa, fb)):
                best = np.fmax(best, (u * v).sum(axis=1))  # nan (no mirrored embedding) never wins
        cos[sem] = best
    per = [i for i, (a, b, _) in enumerate(pairs)
           if (rows.get(a) or {}).get("phash") is not None and (rows.get(b) or {}).get("phash") is not None]
    if per:
        ha = np.array([rows[pairs[i][0]]["phash"] for i in per], np.uint64)
        hb = np.array([rows[pairs[i][1]]["phash"] for i in per], np.uint64)
        ham[per] = hamming64(ha, hb)
    return cos, ham


def labelled_report(pairs: list[tuple[str, str, bool]], counts: dict, rows: dict, cos: np.ndarray,
                    ham: np.ndarray, threshold: float | None, max_hamming: int | None, margin: float,
                    edges: np.ndarray | None, notes: list[str]) -> dict:
    """Precision / recall at the run's thresholds and on grids, the best threshold, the
    labelled histogram, and the pairs the labels and the detectors disagree on."""
    missing_ids = sorted({i for a, b, _ in pairs for i in (a, b) if i not in rows})
    in_run = np.array([a in rows and b in rows for a, b, _ in pairs], bool)
    scored = in_run & (~np.isnan(cos) | (ham >= 0))
    truth = np.array([lab for _, _, lab in pairs], bool)
    c, h, t = cos[scored], ham[scored], truth[scored]
    out = {"pairs": len(pairs), **{f"skipped_{k}": v for k, v in counts.items() if k != "rows"},
           "rows": counts.get("rows", 0), "duplicates": int(truth.sum()), "distinct": int((~truth).sum()),
           "pairs_missing": int((~in_run).sum()), "ids_missing": len(missing_ids),
           "missing_ids": missing_ids[:MAX_LISTED], "pairs_unscored": int((in_run & ~scored).sum()),
           "pairs_scored": int(scored.sum()), "without_embedding": int((scored & np.isnan(cos)).sum()),
           "without_phash": int((scored & (ham < 0)).sum()), "notes": notes}
    out["at_run"] = {"threshold": threshold, "max_hamming": max_hamming, **metrics(predict(c, h, threshold,
                                                                                           max_hamming), t)}
    if threshold is not None:
        out["semantic_only"] = metrics(predict(c, h, threshold, None), t)
        rows_t = [{"threshold": float(x), **metrics(predict(c, h, float(x), max_hamming), t)}
                  for x in grid(threshold, margin)]
        out["threshold_grid"] = rows_t
        out["best_threshold"] = best_threshold(rows_t, "threshold")
        if edges is not None:
            dup, _, _ = bin_counts(c[t], edges)
            dis, _, _ = bin_counts(c[~t], edges)
            with np.errstate(invalid="ignore"):
                out["histogram"] = {"duplicates": dup.tolist(), "distinct": dis.tolist(),
                                    "duplicates_below_range": int((c[t] < edges[0]).sum()),
                                    "distinct_below_range": int((c[~t] < edges[0]).sum())}
    if max_hamming is not None:
        out["perceptual_only"] = metrics(predict(c, h, None, max_hamming), t)
        rows_h = [{"max_hamming": m, **metrics(predict(c, h, threshold, m), t)} for m in range(HAMMING_GRID + 1)]
        out["hamming_grid"] = rows_h
        out["best_max_hamming"] = best_threshold(rows_h, "max_hamming")
    pred = predict(cos, ham, threshold, max_hamming)
    dis = []
    for i in np.flatnonzero(scored & (pred != truth))[:MAX_LISTED * 2]:
        a, b, lab = pairs[i]
        dis.append({"id_a": a, "id_b": b, "label": bool(lab), "predicted": bool(pred[i]),
                    "cosine": None if np.isnan(cos[i]) else round(float(cos[i]), 6),
                    "hamming": None if ham[i] < 0 else int(ham[i])})
    out["disagreements"] = dis
    return out


# --------------------------------------------------------------------------- report

def build(cfg: PipelineConfig, labels: str | None = None, per_side: int = 8, label_sample: int = 0) -> dict:
    fs, root = mio.filesystem(cfg.output, cfg.storage)
    try:
        summary = mio.read_run_summary(fs, root, "dedup-report", cfg.output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    nd = summary.get("near_dedup")
    stage = mio.join(root, "stages", "near_dedup.pairs")
    if not nd or not mio.is_committed(fs, stage):
        raise ConfigError(f"dedup-report: the run in {cfg.output} has no near-duplicate stage "
                          "(stages/near_dedup.pairs; run it with near_dedup.enabled to the near_dedup stage)")
    sem = nd.get("semantic") or {}
    threshold = float(sem["threshold"]) if sem.get("threshold") is not None else None
    max_hamming = cfg.near_dedup.max_hamming if cfg.near_dedup.perceptual else None
    margin = cfg.near_dedup.report_margin
    edges = hist_edges(threshold, margin) if threshold is not None else None
    pairs_labelled, label_counts = [], {}
    if labels:
        pairs_labelled, label_counts = read_label_rows(_read_text(labels, cfg), labels)
    got = scan_pairs(_files(fs, stage), fs, threshold, edges, max_hamming, max(per_side, label_sample))
    shown = {k: got[k][:per_side] for k in ("above", "below", "loose")}
    ids = {p[c] for k in ("above", "below", "loose") for p in got[k] for c in ("id_a", "id_b") if p[c]}
    label_ids = {i for a, b, _ in pairs_labelled for i in (a, b)}
    rows = lookup_rows(fs, root, ids | label_ids)
    if pairs_labelled:  # ids written spreadsheet-safe ('=...) by label_pairs.csv
        unq = {i: unquote_id(i, rows) for i in label_ids if i not in rows}
        more = lookup_rows(fs, root, {v for k, v in unq.items() if v != k})
        rows.update(more)
        pairs_labelled = [(unquote_id(a, rows), unquote_id(b, rows), lab) for a, b, lab in pairs_labelled]
    model = sem.get("model") or cfg.embed.model_for("dedup")
    lab_report = None
    if labels:
        notes = []
        vecs, flips, mean = {}, None, None
        if threshold is not None and model:
            in_run = {i for a, b, _ in pairs_labelled for i in (a, b) if i in rows}
            vecs, note = lookup_embeddings(fs, root, model, in_run)
            if note:
                notes.append(note)
            if cfg.near_dedup.flip:  # the mirrored images' embeddings (plan name <model>_flip)
                flips, note = lookup_embeddings(fs, root, f"{model}_flip", in_run)
                if note:
                    notes.append(note.replace("scored by pHash only", "scored without their mirror images"))
            mean, centre_model = read_centre(fs, root)
            emb_model = ((summary.get("embed") or {}).get(model) or {}).get("model_id")
            if mean is not None and centre_model and emb_model and centre_model != emb_model:
                notes.append(f"the centring mean is of {centre_model}, the embeddings of {emb_model}: labelled "
                             "cosines may differ from the run's")
            if sem.get("centred", cfg.near_dedup.center) and mean is None:
                notes.append("the run recorded no centring mean (stages/near_dedup.centre): labelled pairs are "
                             "scored by pHash only; rerun near_dedup with this version to score them by embedding")
                vecs = {}
        cos, ham = score_pairs(pairs_labelled, rows, vecs, mean, bool(sem.get("centred", cfg.near_dedup.center)),
                               flips)
        lab_report = labelled_report(pairs_labelled, label_counts, rows, cos, ham, threshold, max_hamming, margin,
                                     edges, notes)
    removed_by = nd.get("removed_by_policy") or {}
    report = {
        "run": cfg.output, "model": model if threshold is not None else None, "threshold": threshold,
        "max_hamming": max_hamming, "report_margin": margin, "policy": nd.get("policy"),
        "flip": bool(cfg.near_dedup.flip) if threshold is not None else None,
        "removed": nd.get("removed"), "removed_by_policy": {k: removed_by.get(k) for k in ("direct", "component")},
        "groups": nd.get("groups"), "members": nd.get("members"), "alive": nd.get("alive"),
        "semantic_skipped": nd.get("semantic_skipped"),
        "pairs": got["counts"], "semantic_histogram": got["semantic"], "hamming_histogram": got["hamming"],
        "note": "found pairs are each detector's spanning forest (every row's best match, not every pair of a "
                "group); near misses are at most two per row, within report_margin below the threshold",
        "nearest": {k: [_pair_row(p, rows) for p in shown[k]] for k in shown},
        "labels": lab_report,
    }
    out = mio.join(root, "dedup_report")
    fs.makedirs(out, exist_ok=True)
    if label_sample:
        sample = got["above"][:label_sample] + got["below"][:label_sample]
        sample_rows = lookup_rows(fs, root, {p[c] for p in sample for c in ("id_a", "id_b") if p[c]} - set(rows))
        rows.update(sample_rows)
        with fs.open(mio.join(out, "label_pairs.csv"), "wb") as f:
            f.write(pairs_csv(sample, rows).encode())
    with fs.open(mio.join(out, "report.json"), "wb") as f:
        f.write(json.dumps(report, indent=2, sort_keys=True).encode())
    pictured = [rows[i] for k in shown for p in shown[k] for i in (p["id_a"], p["id_b"]) if i in rows]
    for d in (lab_report or {}).get("disagreements", []):
        pictured += [rows[i] for i in (d["id_a"], d["id_b"]) if i in rows]
    images = thumbs.thumbnails(thumbs.reasons_by_uri(pictured), cfg.storage, cfg.validate_,
                               bytes_column=cfg.input.bytes_column)
    src = {u: s for u, (s, _) in images.items()}
    why = {u: w for u, (_, w) in images.items()}
    page = render(report, rows, src, why)
    with fs.open(mio.join(out, "index.html"), "wb") as f:
        f.write(page.encode())
    report["files"] = {"json": mio.to_uri(fs, mio.join(out, "report.json")),
                       "html": mio.to_uri(fs, mio.join(out, "index.html"))}
    if label_sample:
        report["files"]["label_pairs"] = mio.to_uri(fs, mio.join(out, "label_pairs.csv"))
    return report


def _read_text(path: str, cfg: PipelineConfig) -> str:
    try:
        fs, p = mio.filesystem(path, cfg.storage)
        with fs.open(p, "rb") as f:
            return f.read().decode("utf-8-sig")
    except (OSError, ValueError) as e:
        raise ConfigError(f"labels error: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") from None


def _pair_row(p: dict, rows: dict) -> dict:
    a, b = rows.get(p["id_a"]) or {}, rows.get(p["id_b"]) or {}
    out = {**p, "uri_a": a.get("uri"), "uri_b": b.get("uri"), "reason_a": a.get("reason"),
           "reason_b": b.get("reason"), "similarity": round(float(p["similarity"]), 6)}
    if p["detector"] == "perceptual":
        out["hamming"] = int(round((1 - p["similarity"]) * 64))
    return out


def pairs_csv(pairs: list[dict], rows: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id_a", "id_b", "label", "detector", "kind", "similarity", "uri_a", "uri_b"])
    for p in pairs:  # every cell safe to open in a spreadsheet (no formula runs)
        w.writerow([spreadsheet_safe(v) for v in (
            p["id_a"], p["id_b"], "", p["detector"], p["kind"], f"{p['similarity']:.5f}",
            (rows.get(p["id_a"]) or {}).get("uri"), (rows.get(p["id_b"]) or {}).get("uri"))])
    return buf.getvalue()


# --------------------------------------------------------------------------- page

def _fmt(p: dict | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{p['value']:.3f} ({p['k']}/{p['n']}; 95% CI {lo:.3f}-{hi:.3f})"


def _image(row: dict | None, src: dict, why: dict, pid: str) -> str:
    e = html.escape
    if not row:
        return (f'<figure><div class="missing">not in this run (a reference image?)</div>'
                f'<figcaption>{e(pid or "")}</figcaption></figure>')
    uri = row.get("uri") or ""
    name = e(uri.rsplit("/", 1)[-1])
    s = src.get(uri)
    img = f'<img src="{s}" alt="{name}">' if s else f'<div class="missing">{e(why.get(uri) or "unreadable")}</div>'
    reason = f"<br>{e(row['reason'])}" if row.get("reason") else ""
    return (f'<figure>{img}<figcaption title="{e(uri)}">{name}<br><code>{e(row["id"])}</code>{reason}'
            f"</figcaption></figure>")


def _pair(p: dict, rows: dict, src: dict, why: dict, caption: str) -> str:
    return (f'<div class="pair">{_image(rows.get(p["id_a"]), src, why, p["id_a"])}'
            f'{_image(rows.get(p["id_b"]), src, why, p["id_b"])}<p>{caption}</p></div>')


def _bars(labels: list[str], series: dict[str, list[int]], mark: int | None) -> str:
    e = html.escape
    colours = ["#4a7", "#e94", "#47c", "#c44"]
    top = max([1] + [v for s in series.values() for v in s])
    head = "".join(f'<th><span class=sw style="background:{colours[j % 4]}"></span>{e(k)}</th>'
                   for j, k in enumerate(series))
    out = [f"<table class=hist><tr><th>bin</th>{head}<th></th></tr>"]
    for i, lab in enumerate(labels):
        cls = " class=mark" if mark is not None and i == mark else ""
        cells = "".join(f"<td>{s[i]}</td>" for s in series.values())
        bars = "".join(f'<span style="width:{max(1, int(240 * s[i] / top))}px;background:{colours[j % 4]}"></span>'
                       for j, s in enumerate(series.values()) if s[i])
        out.append(f"<tr{cls}><td>{e(lab)}</td>{cells}<td class=bars>{bars}</td></tr>")
    out.append("</table>")
    return "".join(out)


def _grid_table(rows: list[dict], key: str, run_value, best: dict | None) -> str:
    e = html.escape
    out = [f"<table><tr><th>{e(key)}</th><th>precision</th><th>recall</th><th>F1</th><th>TP</th><th>FP</th>"
           "<th>FN</th></tr>"]
    for r in rows:
        tags = []
        if run_value is not None and abs(r[key] - run_value) < 1e-9:
            tags.append("run")
        if best is not None and abs(r[key] - best[key]) < 1e-9:
            tags.append("best")
        cls = f" class='{' '.join(tags)}'" if tags else ""
        label = f"{r[key]:g}" + (f" ({', '.join(tags)})" if tags else "")
        out.append(f"<tr{cls}><td>{label}</td><td>{_fmt(r['precision'])}</td><td>{_fmt(r['recall'])}</td>"
                   f"<td>{r['f1']:.3f}</td><td>{r['tp']}</td><td>{r['fp']}</td><td>{r['fn']}</td></tr>")
    out.append("</table>")
    return "".join(out)


def render(report: dict, rows: dict, src: dict, why: dict) -> str:
    e = html.escape
    t, mh = report["threshold"], report["max_hamming"]
    rb = report["removed_by_policy"]
    pc_ = report["pairs"]
    parts = ["<h1>Near-duplicates</h1>",
             f"<p>Run {e(str(report['run']))}. Semantic: "
             + (f"model {e(str(report['model']))}, cosine &ge; {t:g}"
                + (" (the larger of the plain and mirrored images' cosines)" if report.get("flip") else "")
                if t is not None else
                f"off{(' (' + e(report['semantic_skipped']) + ')') if report.get('semantic_skipped') else ''}")
             + "; perceptual: " + (f"pHash Hamming &le; {mh}" if mh is not None else "off") + ".</p>",
             f"<p>Policy <b>{e(str(report['policy']))}</b>: {report['removed']} removed "
             f"(direct policy: {rb.get('direct')}, component policy: {rb.get('component')}) from "
             f"{report['groups']} groups of {report['members']} rows; {report['alive']} rows were compared.</p>",
             f"<p>Pairs table: found {e(json.dumps(pc_['found'], sort_keys=True))}, {pc_['near_miss']} near misses, "
             f"removals {e(json.dumps(pc_['removal'], sort_keys=True))}. {e(report['note'])}.</p>"]
    hist = report["semantic_histogram"]
    if hist:
        edges = hist["edges"]
        labels = [f"{edges[i]:.2f} - {edges[i + 1]:.2f}" for i in range(len(edges) - 1)]
        series = {"found (>= threshold)": hist["found"], "near misses": hist["near_miss"]}
        lab = (report.get("labels") or {}).get("histogram")
        if lab:
            series.update({"labelled duplicates": lab["duplicates"], "labelled distinct": lab["distinct"]})
        mark = int(np.searchsorted(np.asarray(edges), t + 1e-9, side="right") - 1)
        low = f"{hist['found_below_range'] + hist['near_miss_below_range']} found or near misses"
        if lab:
            low += (f", {lab['duplicates_below_range']} labelled duplicates, {lab['distinct_below_range']} labelled "
                    "distinct pairs")
        parts.append(f"<h2>Semantic similarity of verified pairs around the threshold</h2>"
                     f"<p>Bins of {WIDTH:g}; the highlighted bin starts at the threshold. Below the range: {low}.</p>"
                     + _bars(labels, series, mark))
    ham = report["hamming_histogram"]
    if ham:
        parts.append("<h2>Perceptual pairs by pHash Hamming distance</h2>"
                     + _bars([str(d) for d in ham["distance"]], {"found": ham["found"]}, None))
    near = report["nearest"]
    if t is not None:
        for key, title in (("above", f"Pairs just above the threshold (found, removed or grouped; cosine &ge; {t:g})"),
                           ("below", f"Pairs just below the threshold (near misses, kept; cosine &lt; {t:g})")):
            parts.append(f"<h2>{title}</h2><div class=grid>")
            parts += [_pair(p, rows, src, why, f"cosine {p['similarity']:.4f} ({p['similarity'] - t:+.4f})")
                      for p in near[key]] or ["<p>none</p>"]
            parts.append("</div>")
    if mh is not None:
        parts.append("<h2>Loosest perceptual matches (largest Hamming distance found)</h2><div class=grid>")
        parts += [_pair(p, rows, src, why, f"Hamming {p['hamming']} (max {mh})") for p in near["loose"]] \
            or ["<p>none</p>"]
        parts.append("</div>")
    lab = report.get("labels")
    if lab:
        parts.append(f"<h2>On your labelled pairs</h2><p>{lab['pairs']} labelled pairs ({lab['duplicates']} "
                     f"duplicates, {lab['distinct']} distinct); {lab['pairs_scored']} scored; "
                     f"{lab['pairs_missing']} with an id not in this run ({lab['ids_missing']} ids); "
                     f"{lab['pairs_unscored']} with neither embeddings nor pHashes; skipped rows: "
                     f"{lab['skipped_unlabelled']} unlabelled, {lab['skipped_self_pairs']} self-pairs, "
                     f"{lab['skipped_repeated']} repeated, {lab['skipped_conflicting']} conflicting.</p>")
        for n in lab["notes"]:
            parts.append(f"<p class=note>{e(n)}</p>")
        if lab["missing_ids"]:
            parts.append("<p>Ids not in the run: " + ", ".join(f"<code>{e(i)}</code>" for i in lab["missing_ids"])
                         + ("&hellip;" if lab["ids_missing"] > len(lab["missing_ids"]) else "") + "</p>")
        at = lab["at_run"]
        parts.append(f"<p>At the run's thresholds: precision {_fmt(at['precision'])}, recall {_fmt(at['recall'])}, "
                     f"F1 {at['f1']:.3f}." + "".join(
                         f" {name} alone: precision {_fmt(lab[k]['precision'])}, recall {_fmt(lab[k]['recall'])}."
                         for k, name in (("semantic_only", "Cosine"), ("perceptual_only", "pHash")) if lab.get(k))
                     + "</p>")
        if lab.get("threshold_grid"):
            b = lab["best_threshold"]
            if b:
                parts.append(f"<p><b>Best threshold: {b['threshold']:g}</b> (best F1 among the highest precision; "
                             f"tied over {b['tied_range'][0]:g}-{b['tied_range'][1]:g}): precision "
                             f"{_fmt(b['precision'])}, recall {_fmt(b['recall'])}.</p>")
            parts.append(f"<h3>Cosine threshold (pHash at Hamming &le; {mh})</h3>"
                         + _grid_table(lab["threshold_grid"], "threshold", t, b))
        if lab.get("hamming_grid"):
            b = lab["best_max_hamming"]
            parts.append(f"<h3>max_hamming (cosine threshold {t if t is not None else 'off'})</h3>"
                         + _grid_table(lab["hamming_grid"], "max_hamming", mh, b))
        if lab["disagreements"]:
            parts.append("<h3>Where your labels and the run disagree</h3><div class=grid>")
            for d in lab["disagreements"]:
                sim = [f"cosine {d['cosine']:.4f}" if d["cosine"] is not None else "no embedding",
                       f"Hamming {d['hamming']}" if d["hamming"] is not None else "no pHash"]
                cap = (f"label {'duplicate' if d['label'] else 'distinct'}, run "
                       f"{'duplicate' if d['predicted'] else 'distinct'}; {', '.join(sim)}")
                parts.append(_pair(d, rows, src, why, cap))
            parts.append("</div>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:2px 6px;font-size:12px}.grid{display:flex;flex-wrap:wrap;gap:12px}"
             ".pair{display:flex;flex-wrap:wrap;width:350px;border:1px solid #ddd;padding:4px}.pair p{width:100%;"
             "margin:2px;font-size:12px}figure{margin:0 4px;width:165px;font-size:11px;overflow-wrap:anywhere}"
             "img{max-width:160px;max-height:160px}.missing{width:160px;height:100px;background:#eee;font-size:11px}"
             ".bars{width:245px}.bars span{display:block;height:5px;margin:1px 0}.sw{display:inline-block;width:9px;"
             "height:9px;margin-right:3px}tr.mark td,tr.run td{background:#ffd}"
             "tr.best td{font-weight:bold}.note{color:#a50}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>biocurate near-duplicate report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def run_config(config: str | None, output: str | None) -> PipelineConfig:
    """The config given, else the one the run in ``output`` recorded."""
    from pipeline.examples_report import run_config as recorded

    return recorded(config, output, "dedup-report")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.per_side < 0 or args.label_sample < 0:
            raise ConfigError("dedup-report: --per-side and --label-sample must be >= 0")
        cfg = run_config(args.config, args.output)
        report = build(cfg, args.labels, args.per_side, args.label_sample)
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    lab = report["labels"]
    extra = ""
    if lab:
        at = lab["at_run"]
        extra = f"; labelled pairs: precision {_fmt(at['precision'])}, recall {_fmt(at['recall'])}"
        if lab.get("best_threshold"):
            extra += f"; best threshold {lab['best_threshold']['threshold']:g}"
    print(f"biocurate: near-duplicate report in {report['files']['html']}{extra}")
    return 0
