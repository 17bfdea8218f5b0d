"""``report.html``: one self-contained page per run that people would rather look at than
``summary.json``. No network is needed to view it (no http(s) URL in it; thumbnails are
``data:`` URIs, charts inline SVG); at most 20 MB whatever the corpus size.

Written at the end of every run (``plan.run``), or again for a finished run::

    python pipeline/run.py report --output RUN_DIR

Reads ``summary.json`` and streams the committed ``curated/`` and ``rejected/`` tables
(a few columns, batch by batch, a bounded number of rows kept: never a whole corpus in
memory), plus ``stages/near_dedup.pairs`` when there. Sections:

* the funnel: inputs -> kept, per stage and per reason;
* histograms of every score (aesthetic, non-natural margin, blur, exposure, contrast,
  duplicate similarity), with the run's thresholds drawn on them;
* thumbnails (``pipeline.thumbs``: a reject whose bytes are unsafe -- bomb, timeout, too
  large, corrupt -- is never read again and shows its reason instead; the others are
  decoded under the run's ``validate`` limits): a sample of rejects per reason (by
  hash(seed, id)), near-duplicate groups
  side by side with their similarity, the images closest to each threshold on both sides,
  a few images per top-level cluster, and taxonomy coverage before/after sampling;
* timings per stage and throughput.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import sys
import time
from collections import Counter, defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from manifests import io as mio
from manifests.schema import Stage
from pipeline import thumbs
from manifests.config import TAXON_COLUMNS, ConfigError, StorageConfig
from stages.kernels.hashing import seeded_rank

log = logging.getLogger("biocurate.report")
MAX_BYTES = 20 * 2**20
PER_REASON = 6
PER_CLUSTER = 4
NEAR_THRESHOLD = 4
DUP_GROUPS = 6
THUMB = 128

# (column, title, log scale, how the threshold is found in the config: (section, key, kind))
SCORES = [
    ("aesthetic", "Aesthetic score (LAION)", False, [("aesthetic", "min_score", "min")]),
    ("nonnatural_margin", "Non-natural: margin to the category's threshold", False, [(None, 0.0, "min")]),
    ("q_blur", "Sharpness: variance of the Laplacian", True, [("quality", "min_blur", "min")]),
    ("q_dark_clip", "Exposure: fraction of crushed shadows", False, [("quality", "max_dark_clip", "max")]),
    ("q_bright_clip", "Exposure: fraction of blown highlights", False, [("quality", "max_bright_clip", "max")]),
    ("q_contrast", "RMS contrast", False, [("quality", "min_contrast", "min")]),
    ("q_entropy", "Gray-level entropy (bits)", False, [("quality", "min_entropy", "min")]),
    ("near_dup_similarity", "Near-duplicate similarity (removed copies)", False,
     [("near_dedup", "threshold", "max"), ("near_dedup", "max_hamming", "hamming")]),
]


def thresholds(config: dict, spec: list) -> list[tuple[str, float]]:
    out = []
    for section, key, kind in spec:
        if section is None:
            out.append(("threshold", float(key)))
            continue
        v = (config.get(section) or {}).get(key)
        if v is None:
            continue
        if kind == "hamming":
            out.append((f"pHash Hamming {v}", 1 - float(v) / 64))
        else:
            out.append((f"{section}.{key}", float(v)))
    return out


class KeepSmallest:
    """The k rows with the smallest key per group, over a stream of batches."""

    def __init__(self, k: int):
        self.k, self.rows = k, defaultdict(list)

    def add(self, group, key: float, row: dict) -> None:
        rows = self.rows[group]
        rows.append((key, row))
        if len(rows) > 4 * self.k:
            rows.sort(key=lambda t: t[0])
            del rows[self.k :]

    def get(self) -> dict:
        return {g: [r for _, r in sorted(v, key=lambda t: t[0])[: self.k]] for g, v in self.rows.items()}


class Histogram:
    """Values collected in a bounded reservoir (exact below it), binned at the end."""

    def __init__(self, cap: int = 200_000, seed: int = 0):
        self.cap, self.values, self.seen = cap, [], 0
        self.rng = np.random.default_rng(seed)

    def add(self, v: np.ndarray) -> None:
        v = v[np.isfinite(v)]
        self.seen += len(v)
        self.values.append(v)
        if sum(len(x) for x in self.values) > 2 * self.cap:
            allv = np.concatenate(self.values)
            self.values = [self.rng.choice(allv, self.cap, replace=False)]

    def array(self) -> np.ndarray:
        return np.concatenate(self.values) if self.values else np.zeros(0)


# --------------------------------------------------------------------------- reading

def _files(fs, root: str, part: str) -> list[str]:
    path = mio.join(root, part)
    if not mio.is_committed(fs, path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet"))


def _batches(fs, files: list[str], columns: list[str]):
    if not files:
        return
    d = pads.dataset(files, filesystem=mio.arrow_filesystem(fs), format="parquet")
    have = [c for c in columns if c in d.schema.names]
    for b in d.to_batches(columns=have, batch_size=65536):
        yield pa.Table.from_batches([b])


def collect(fs, root: str, summary: dict) -> dict:
    """One streaming pass over curated and rejected: histograms and the few rows shown."""
    cfg = summary.get("config") or {}
    seed = int((cfg.get("run") or {}).get("seed", 0))
    hists = {c: Histogram() for c, *_ in SCORES}
    per_reason = KeepSmallest(PER_REASON)
    near = {c: KeepSmallest(NEAR_THRESHOLD) for c, *_ in SCORES}
    per_cluster = KeepSmallest(PER_CLUSTER)
    taxa_before, taxa_after = Counter(), Counter()
    score_cols = [c for c, *_ in SCORES]
    cluster_col = None
    taxon_col = None
    for part in ("curated", "rejected"):
        files = _files(fs, root, part)
        if not files:
            continue
        names = pads.dataset(files, filesystem=mio.arrow_filesystem(fs), format="parquet").schema.names
        levels = sorted((c for c in names if c.startswith("cluster_l")), key=lambda c: int(c[9:]))
        cluster_col = levels[-1] if levels else cluster_col
        taxon_col = taxon_col or next((c for c in TAXON_COLUMNS if c in names), None)
        cols = ["id", "uri", "stage", "reason", "detail", *score_cols, *levels, *([taxon_col] if taxon_col else [])]
        for t in _batches(fs, files, cols):
            n = len(t)
            ids = t["id"].to_pylist()
            rank = seeded_rank(seed, ids).astype(np.float64)
            reason = t["reason"].to_pylist() if "reason" in t.column_names else [None] * n
            rows = t.select([c for c in ("id", "uri", "reason", "detail", *score_cols) if c in t.column_names])
            as_rows = None
            for c, _, _, spec in SCORES:
                if c not in t.column_names:
                    continue
                v = t[c].to_numpy(zero_copy_only=False).astype(np.float64)
                hists[c].add(v)
                for label, thr in thresholds(cfg, spec):
                    d = v - thr
                    for above in (False, True):
                        side = np.flatnonzero(np.isfinite(d) & ((d >= 0) if above else (d < 0)))
                        side = side[np.argsort(np.abs(d[side]), kind="stable")[:NEAR_THRESHOLD]]
                        for i in side:
                            as_rows = as_rows or rows.to_pylist()
                            near[c].add((label, above), abs(d[i]), as_rows[i])
            for i in range(n):
                if reason[i] is not None:
                    as_rows = as_rows or rows.to_pylist()
                    per_reason.add(reason[i], rank[i], as_rows[i])
            if part == "curated" and cluster_col in t.column_names:
                top = t[cluster_col].to_pylist()
                for i in range(n):
                    if top[i] is not None:
                        as_rows = as_rows or rows.to_pylist()
                        per_cluster.add(int(top[i]), rank[i], as_rows[i])
            if taxon_col and taxon_col in t.column_names:
                tax = t[taxon_col].to_pylist()
                for i in range(n):
                    if tax[i] is None:
                        continue
                    if part == "curated" or reason[i] == "not_sampled":
                        taxa_before[str(tax[i])] += 1
                    if part == "curated":
                        taxa_after[str(tax[i])] += 1
    return {"hists": hists, "per_reason": per_reason.get(), "near": {c: k.get() for c, k in near.items()},
            "per_cluster": per_cluster.get(), "cluster_col": cluster_col, "taxon_col": taxon_col,
            "taxa_before": taxa_before, "taxa_after": taxa_after}


def dup_groups(fs, root: str, seed: int) -> list[dict]:
    """A few near-duplicate groups (the smallest hash(seed, group)) with their pairs,
    streamed: only the pairs of the groups chosen so far are held."""
    kept: dict[str, tuple[int, list]] = {}
    for t in _batches(fs, _files(fs, root, "stages/near_dedup.pairs"), ["group", "id_a", "id_b", "detector",
                                                                       "similarity", "kind"]):
        if "kind" in t.column_names:  # near misses (below the threshold) are dedup-report's, not a group's
            t = t.filter(pc.and_kleene(pc.is_valid(t["group"]), pc.not_equal(t["kind"], "near_miss")))
        gs = t["group"].to_pylist()
        rank = seeded_rank(seed, gs)
        for i, row in enumerate(t.to_pylist()):
            g = gs[i]
            if g not in kept:
                if len(kept) >= DUP_GROUPS and int(rank[i]) >= max(r for r, _ in kept.values()):
                    continue
                kept[g] = (int(rank[i]), [])
                if len(kept) > DUP_GROUPS:
                    kept.pop(max(kept, key=lambda k: kept[k][0]))
            kept[g][1].append(row)
    return [{"group": g, "pairs": kept[g][1]} for g in sorted(kept, key=lambda k: kept[k][0])]


def uris_of(fs, root: str, ids: set[str]) -> dict[str, dict]:
    """id -> {uri, reason} for a few ids (one pass over both tables)."""
    out = {}
    if not ids:
        return out
    wanted = pa.array(sorted(ids))
    for part in ("curated", "rejected"):
        for t in _batches(fs, _files(fs, root, part), ["id", "uri", "reason"]):
            hit = t.filter(pc.is_in(t["id"], value_set=wanted))
            for r in hit.to_pylist():
                out[r["id"]] = {"uri": r["uri"], "reason": r.get("reason")}
    return out


# --------------------------------------------------------------------------- HTML pieces

def esc(x) -> str:
    return html.escape(str(x), quote=True)


def svg_histogram(values: np.ndarray, marks: list[tuple[str, float]], log: bool, width: int = 520,
                  height: int = 150) -> str:
    if len(values) == 0:
        return "<p class=muted>no values</p>"
    x = np.log10(1 + np.maximum(values, 0)) if log else values
    m = [(label, math.log10(1 + max(t, 0)) if log else t) for label, t in marks]
    lo = min([float(x.min())] + [t for _, t in m])
    hi = max([float(x.max())] + [t for _, t in m])
    if hi <= lo:
        hi = lo + 1
    counts, edges = np.histogram(x, bins=40, range=(lo, hi))
    top = max(1, counts.max())
    pad, w, h = 30, width - 40, height - 40
    bars = []
    for i, c in enumerate(counts):
        bh = h * c / top
        bx = pad + w * i / len(counts)
        bars.append(f'<rect x="{bx:.1f}" y="{10 + h - bh:.1f}" width="{w / len(counts) - 1:.1f}" '
                    f'height="{bh:.1f}" class="bar"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {c}</title></rect>')
    lines = []
    for label, t in m:
        tx = pad + w * (t - lo) / (hi - lo)
        lines.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="5" y2="{10 + h}" class="thr"/>'
                     f'<text x="{tx + 3:.1f}" y="14" class="thrlabel">{esc(label)}</text>')
    fmt = (lambda v: f"{10 ** v - 1:.3g}") if log else (lambda v: f"{v:.3g}")
    axis = (f'<text x="{pad}" y="{height - 8}" class="axis">{fmt(lo)}</text>'
            f'<text x="{pad + w}" y="{height - 8}" class="axis" text-anchor="end">{fmt(hi)}</text>'
            f'<text x="{pad + w / 2}" y="{height - 8}" class="axis" text-anchor="middle">'
            f'{len(values)} values{" (log scale)" if log else ""}, peak {top}</text>')
    return (f'<svg width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
            + "".join(bars) + "".join(lines) + axis + "</svg>")


def bar(value: float, total: float, label: str) -> str:
    pct = 100 * value / total if total else 0
    return f'<div class="hbar"><div style="width:{pct:.1f}%"></div><span>{esc(label)}</span></div>'


def thumb(got: tuple[str | None, str | None] | None, caption: str) -> str:
    """A figure: the thumbnail, or a placeholder saying why there is none."""
    src, why = got or (None, "not readable")
    img = (f'<img src="{src}" alt="{esc(caption)}">' if src else f'<div class="noimg">{esc(why)}</div>')
    return f'<figure>{img}<figcaption>{esc(caption)}</figcaption></figure>'


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}
table{border-collapse:collapse}td,th{padding:3px 10px;text-align:left;border-bottom:1px solid #eee}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px}
.hbar{position:relative;width:420px;height:16px;background:#f2f2f2;margin:2px 0}
.hbar div{height:100%;background:#7aa6d6}.hbar span{position:absolute;left:6px;top:0;font-size:12px}
.bar{fill:#7aa6d6}.thr{stroke:#d33;stroke-width:2}.thrlabel{fill:#d33;font-size:11px}.axis{font-size:11px;fill:#555}
.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:136px}
figure img{max-width:128px;max-height:128px;display:block;border:1px solid #ccc}
figcaption{font-size:11px;word-break:break-all;color:#444}.noimg{width:128px;height:64px;background:#eee;font-size:11px;color:#666}
.muted{color:#888}.group{border:1px solid #ddd;padding:6px;margin:6px 0}.hist{display:inline-block;margin:6px 12px}
"""


def skipped_line(summary: dict) -> str:
    """One line on the input files skipped because of their extension (none: nothing)."""
    skipped = summary.get("input_skipped") or {}
    n = int(skipped.get("count") or 0)
    if n <= 0:
        return ""
    by_ext = sorted((skipped.get("by_extension") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
    kinds = ", ".join(f"{ext or 'no extension'} {k}" for ext, k in by_ext)
    examples = ", ".join(str(x) for x in (skipped.get("examples") or [])[:5])
    return (f"<p id=skipped>{n} file{'s' if n != 1 else ''} skipped by extension"
            + (f" ({esc(kinds)})" if kinds else "") + (f", e.g. {esc(examples)}" if examples else "") + "</p>")


def render(summary: dict, got: dict, groups: list[dict], shown: dict[str, tuple], lookup: dict) -> str:
    cfg = summary.get("config") or {}
    inputs, curated = summary.get("inputs", 0), summary.get("curated", 0)
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>biocurate run report</title>"
           f"<style>{CSS}</style></head><body>",
           f"<h1>biocurate run report</h1><p>{esc(summary.get('input_kind'))} input "
           f"<code>{esc((cfg.get('input') or {}).get('path'))}</code> &rarr; <code>{esc(cfg.get('output'))}</code>"
           f", version {esc(summary.get('version', 1))}, biocurate {esc((summary.get('versions') or {}).get('biocurate'))}"
           "</p>"]
    out.extend(f"<p class=warn>warning: {esc(w)}</p>" for w in summary.get("warnings") or [])
    # funnel
    out.append("<h2 id=funnel>Funnel</h2><table><tr><th>step</th><th>rows</th><th></th></tr>")
    out.append(f"<tr><td>images in</td><td class=n>{inputs}</td><td>{bar(inputs, inputs, '100%')}</td></tr>")
    left = inputs
    order = [st.value for st in Stage]
    by_stage = summary.get("rejected_by_stage") or {}
    for stage, reasons in sorted(by_stage.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99):
        lost = sum(reasons.values())
        left -= lost
        out.append(f"<tr><td><b>{esc(stage)}</b></td><td class=n>&minus;{lost}</td>"
                   f"<td>{bar(left, inputs, f'{left} left')}</td></tr>")
        for reason, k in sorted(reasons.items(), key=lambda kv: -kv[1]):
            out.append(f"<tr><td>&nbsp;&nbsp;{esc(reason)}</td><td class=n>{k}</td><td></td></tr>")
    out.append(f"<tr><td><b>kept</b></td><td class=n>{curated}</td><td>{bar(curated, inputs, 'curated')}</td></tr>"
               "</table>" + skipped_line(summary))
    ex = summary.get("examples") or {}
    if ex.get("chosen"):  # which filter method ran, and why (examples.method auto: the bank's CV)
        out.append(f"<p id=filter-method>Non-natural filter: <b>{esc(ex['chosen'])}</b> ({esc(ex.get('why'))})</p>")
    if summary.get("refresh"):
        d = (summary["refresh"] or {}).get("diff") or {}
        out.append("<p>Refresh of <code>" + esc(summary["refresh"].get("previous")) + "</code>: "
                   + ", ".join(f"{esc(k)} {v}" for k, v in d.items()) + "</p>")
    # histograms
    out.append("<h2 id=scores>Scores</h2>")
    for c, title, log, spec in SCORES:
        values = got["hists"][c].array()
        if not len(values):
            continue
        marks = thresholds(cfg, spec)
        out.append(f"<div class=hist><b>{esc(title)}</b> <code>{esc(c)}</code><br>"
                   f"{svg_histogram(values, marks, log)}</div>")
    # rejects per reason
    out.append("<h2 id=rejects>Rejects per reason (a sample by hash(seed, id))</h2>")
    for reason, rows in sorted(got["per_reason"].items()):
        out.append(f"<h3>{esc(reason)}</h3><div class=grid>"
                   + "".join(thumb(shown.get(r["uri"]), f"{r['detail'] or ''}") for r in rows) + "</div>")
    # near-duplicate groups
    if groups:
        out.append("<h2 id=duplicates>Near-duplicate groups</h2>")
        for g in groups:
            members = sorted({x for p in g["pairs"] for x in (p["id_a"], p["id_b"]) if x})
            sims = ", ".join(f"{p['detector']} {p['similarity']:.3f}" for p in g["pairs"][:6])
            figs = []
            for m in members[:8]:
                info = lookup.get(m) or {}
                figs.append(thumb(shown.get(info.get("uri")), f"{'kept' if info.get('reason') is None else info['reason']}"
                                  f" {m[:10]}"))
            out.append(f"<div class=group><div>group {esc(g['group'])}: {esc(sims)}</div><div class=grid>"
                       + "".join(figs) + "</div></div>")
    # closest to thresholds
    blocks = []
    for c, title, _, _ in SCORES:
        for (label, above), rows in sorted(got["near"][c].items()):
            if rows:
                side = "at or above" if above else "below"
                blocks.append(f"<h3>{esc(c)}: just {side} {esc(label)}</h3><div class=grid>"
                              + "".join(thumb(shown.get(r["uri"]), f"{c}={r.get(c)!s:.6} {r.get('reason') or 'kept'}")
                                        for r in rows) + "</div>")
    if blocks:
        out.append("<h2 id=thresholds>Closest to each threshold</h2>" + "".join(blocks))
    # clusters
    if got["per_cluster"]:
        out.append(f"<h2 id=clusters>Top-level clusters (<code>{esc(got['cluster_col'])}</code>), a few curated "
                   "images each</h2>")
        for k, rows in sorted(got["per_cluster"].items())[:40]:
            out.append(f"<h3>cluster {k}</h3><div class=grid>"
                       + "".join(thumb(shown.get(r["uri"]), r["id"][:10]) for r in rows) + "</div>")
    # taxonomy
    if got["taxa_before"]:
        before, after = got["taxa_before"], got["taxa_after"]

        def entropy(c: Counter) -> float:
            p = np.array(list(c.values()), dtype=np.float64)
            p = p[p > 0] / p.sum()
            return float(-(p * np.log(p)).sum() / math.log(len(before))) if len(before) > 1 else 1.0

        out.append(f"<h2 id=taxonomy>Taxonomy coverage (<code>{esc(got['taxon_col'])}</code>)</h2>"
                   f"<table><tr><th></th><th>before sampling</th><th>after</th></tr>"
                   f"<tr><td>images</td><td class=n>{sum(before.values())}</td><td class=n>{sum(after.values())}</td></tr>"
                   f"<tr><td>taxa</td><td class=n>{len(before)}</td><td class=n>{len(after)}</td></tr>"
                   f"<tr><td>normalized entropy</td><td class=n>{entropy(before):.3f}</td>"
                   f"<td class=n>{entropy(after):.3f}</td></tr></table><table>"
                   "<tr><th>taxon</th><th>before</th><th>after</th></tr>")
        for t, k in before.most_common(30):
            out.append(f"<tr><td>{esc(t)}</td><td>{bar(k, before.most_common(1)[0][1], str(k))}</td>"
                       f"<td>{bar(after.get(t, 0), before.most_common(1)[0][1], str(after.get(t, 0)))}</td></tr>")
        out.append("</table>")
    # timings
    t = summary.get("timings_s") or {}
    total = t.get("total") or 0
    out.append("<h2 id=timings>Timings</h2><table><tr><th>stage</th><th>seconds</th><th></th></tr>")
    for stage, s in t.items():
        if stage != "total":
            out.append(f"<tr><td>{esc(stage)}</td><td class=n>{s:.1f}</td><td>{bar(s, total, '')}</td></tr>")
    rate = inputs / total if total else 0
    out.append(f"<tr><td><b>total</b></td><td class=n>{total:.1f}</td><td>{rate:.1f} images/s end to end"
               f"</td></tr></table>")
    emb = summary.get("embed") or {}
    if emb:
        out.append("<p>Embeddings: " + "; ".join(f"{esc(k)}: {v.get('computed', 0)} computed, {v.get('cached', 0)} "
                                                 f"from the cache on {esc(v.get('device'))}" for k, v in emb.items())
                   + "</p>")
    out.append("</body></html>")
    return "\n".join(out)


def shown_uris(got: dict, lookup: dict) -> dict[str, str | None]:
    """uri -> reject reason (None: kept) of every image the page shows."""
    rows = [r for rows in got["per_reason"].values() for r in rows]
    rows += [r for per in got["near"].values() for rows in per.values() for r in rows]
    rows += [r for rows in got["per_cluster"].values() for r in rows]
    return thumbs.reasons_by_uri(rows + list(lookup.values()))


def encode(page: str) -> bytes:
    """UTF-8; a lone surrogate (a file name that was not UTF-8) is written escaped."""
    return page.encode("utf-8", "backslashreplace")


def build(fs, root: str, summary: dict, storage: StorageConfig | None = None) -> str:
    storage = storage or StorageConfig()
    cfg = summary.get("config") or {}
    seed = int((cfg.get("run") or {}).get("seed", 0))
    got = collect(fs, root, summary)
    groups = dup_groups(fs, root, seed)
    lookup = uris_of(fs, root, {x for g in groups for p in g["pairs"] for x in (p["id_a"], p["id_b"]) if x})
    bytes_column = (cfg.get("input") or {}).get("bytes_column") or "image"
    shown = thumbs.thumbnails(shown_uris(got, lookup), storage, thumbs.limits_of(cfg), THUMB, 70, bytes_column)
    page = render(summary, got, groups, shown, lookup)
    while len(encode(page)) > MAX_BYTES:  # never above the cap, whatever was asked
        drawn = sorted(u for u, (src, _) in shown.items() if src)
        if not drawn:
            break
        for u in drawn[: max(1, len(drawn) // 4)]:
            shown[u] = (None, "left out (page size)")
        page = render(summary, got, groups, shown, lookup)
    return page


def write_report(output: str, storage: StorageConfig | None = None) -> str:
    """Write ``<output>/report.html`` for a run directory; returns its path."""
    fs, root = mio.filesystem(output, storage)
    with fs.open(mio.join(root, "summary.json"), "rb") as f:
        summary = json.loads(f.read())
    page = build(fs, root, summary, storage)
    path = mio.join(root, "report.html")
    mio.write_bytes_atomic(fs, path, encode(page))
    return mio.to_uri(fs, path)


def write_report_safely(output: str, storage: StorageConfig | None = None) -> str | None:
    """:func:`write_report` at the end of a run, which is committed before: a failure is a
    one-line warning (stderr and the log), never a failed run, and a stale report.html of
    an earlier version of the run is removed. Returns the report's path, or None."""
    t0 = time.time()
    try:
        path = write_report(output, storage)
    except Exception as e:  # noqa: BLE001 - the manifest is complete without it
        why = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        print(f"biocurate: warning: report.html not written ({why}); the run is complete, "
              "'biocurate report --output RUN' writes it again", file=sys.stderr)
        log.warning("report.html not written: %s", why)
        try:
            fs, root = mio.filesystem(output, storage)
            if fs.isfile(mio.join(root, "report.html")):
                fs.rm(mio.join(root, "report.html"))
        except Exception:  # noqa: BLE001 - best effort
            pass
        return None
    log.info("report.html in %.1f s", time.time() - t0)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="biocurate report", description="Write report.html for a finished run.")
    p.add_argument("--output", required=True, help="The run directory (local or s3://).")
    args = p.parse_args(argv)
    try:
        fs, root = mio.filesystem(args.output)
        if not fs.exists(mio.join(root, "summary.json")):
            raise ConfigError(f"report error: {args.output} has no summary.json (not a run directory)")
        print(f"biocurate: wrote {write_report(args.output)}")
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    return 0
