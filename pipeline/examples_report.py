"""``biocurate examples-report``: how well the non-natural filter does, and what to look at
to adjust it. Reads a finished run (``summary.json`` and the committed ``stages/filter``
table), never reruns a model, needs no Ray: one streaming pass over the filter table with
bounded memory (a few rows kept per category), whatever the corpus size.

Writes ``<output>/examples_report/``:

* ``report.json`` -- method, thresholds, cross-validated recall / precision / natural
  false rejection of both methods on the example bank (95% Wilson intervals), counts of
  corpus rows near each threshold, and, with a labelled corpus sample (``--labels`` or
  ``examples.labels``), false rejection / recall / precision measured on it;
* ``index.html`` -- the same, with thumbnails of the corpus images just inside and just
  outside each category's threshold, and of the rows the labels disagree with;
* ``label_sample.csv`` (``--label-sample N``) -- N scored corpus rows drawn by
  hash(seed, id), with an empty ``label`` column to fill in (natural or a category) and
  pass back as ``--labels``.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import sys

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from manifests import io as mio
from pipeline import thumbs
from manifests.config import ConfigError, PipelineConfig, load_config
from stages.export import spreadsheet_safe
from stages.kernels.examples import wilson
from stages.kernels.hashing import seeded_rank

COLUMNS = ["id", "uri", "stage", "reason", "detail", "nonnatural_score", "nonnatural_category", "nonnatural_margin"]
BANDS = (0.01, 0.02, 0.05)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="biocurate examples-report",
                                description="Report on the example-based non-natural filter of a finished run.")
    p.add_argument("--config", help="The run's YAML config (default: the config the run recorded in summary.json).")
    p.add_argument("--output", help="The run directory (overrides output; required without --config).")
    p.add_argument("--labels", help="Labelled corpus sample: table with id or uri, and label (overrides examples.labels).")
    p.add_argument("--label-sample", type=int, default=0, metavar="N",
                   help="Also write label_sample.csv: N scored corpus rows drawn by hash(seed, id), to label.")
    p.add_argument("--per-category", type=int, default=8, metavar="K",
                   help="Thumbnails on each side of each category's threshold (default 8).")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- streaming pass

class _Nearest:
    """The k rows with the smallest key seen so far (a few small arrays, merged per batch)."""

    def __init__(self, k: int):
        self.k, self.key, self.rows = k, np.zeros(0), []

    def offer(self, key: np.ndarray, rows: list[dict]) -> None:
        if self.k <= 0 or len(key) == 0:
            return
        key = np.concatenate([self.key, key])
        rows = self.rows + rows
        keep = np.argsort(key, kind="stable")[: self.k]
        self.key, self.rows = key[keep], [rows[i] for i in keep]


def _rows(batch: pa.RecordBatch, idx: np.ndarray) -> list[dict]:
    return [{c: batch.column(c)[int(i)].as_py() for c in COLUMNS} for i in idx]


def scan(files: list[str], fs, per_category: int, label_keys: tuple[set, set], sample_n: int, seed: int) -> dict:
    """One pass over the filter table: per category counts and threshold bands, the rows
    nearest each side of the threshold, the labelled rows, and the label sample."""
    stats: dict = {}
    inside: dict[str, _Nearest] = {}
    outside: dict[str, _Nearest] = {}
    label_ids, label_uris = label_keys
    labelled: list[dict] = []
    sample = _Nearest(sample_n)
    n_rows = n_scored = 0
    dataset = pads.dataset(files, format="parquet", filesystem=mio.arrow_filesystem(fs))
    for batch in dataset.to_batches(columns=COLUMNS):
        n_rows += batch.num_rows
        margin = batch.column("nonnatural_margin").to_numpy(zero_copy_only=False).astype(np.float64)
        scored = ~np.isnan(margin)
        n_scored += int(scored.sum())
        cats = np.array(batch.column("nonnatural_category").to_pylist(), dtype=object)
        for c in set(cats[scored]):
            on = scored & (cats == c)
            m = margin[on]
            st = stats.setdefault(c, {"scored": 0, "inside": 0, **{f"inside_within_{d}": 0 for d in BANDS},
                                      **{f"outside_within_{d}": 0 for d in BANDS}})
            st["scored"] += int(on.sum())
            st["inside"] += int((m < 0).sum())
            for d in BANDS:
                st[f"inside_within_{d}"] += int(((m < 0) & (m >= -d)).sum())
                st[f"outside_within_{d}"] += int(((m >= 0) & (m < d)).sum())
            for side, pick, key in (("inside", on & (margin < 0), -margin), ("outside", on & (margin >= 0), margin)):
                idx = np.flatnonzero(pick)
                if len(idx):
                    near = (inside if side == "inside" else outside).setdefault(c, _Nearest(per_category))
                    top = idx[np.argsort(key[idx], kind="stable")[:per_category]]
                    near.offer(key[top], _rows(batch, top))
        if label_ids or label_uris:
            ids, uris = batch.column("id").to_pylist(), batch.column("uri").to_pylist()
            hit = [i for i in range(batch.num_rows) if ids[i] in label_ids or uris[i] in label_uris]
            labelled.extend(_rows(batch, np.array(hit, dtype=np.int64)))
        if sample_n:
            idx = np.flatnonzero(scored)
            if len(idx):
                rank = seeded_rank(seed, [batch.column("id")[int(i)].as_py() for i in idx]).astype(np.float64)
                top = np.argsort(rank, kind="stable")[:sample_n]
                sample.offer(rank[top], _rows(batch, idx[top]))
    return {"n_rows": n_rows, "n_scored": n_scored, "stats": stats,
            "inside": {c: v.rows for c, v in inside.items()}, "outside": {c: v.rows for c, v in outside.items()},
            "labelled": labelled, "sample": sample.rows}


# --------------------------------------------------------------------------- labels

def read_labels(path: str, cfg: PipelineConfig) -> tuple[dict, dict]:
    """(id -> label, uri -> label) from a labelled table; rows without a label are skipped."""
    from pipeline.examples import read_small_table

    t = read_small_table(path, cfg, "labels error")
    if "label" not in t.column_names or not ({"id", "uri"} & set(t.column_names)):
        raise ConfigError(f"labels error: {path} needs a label column and an id or uri column (has {t.column_names})")
    labels = [None if v is None else str(v).strip() for v in t["label"].to_pylist()]
    by_id, by_uri = {}, {}
    for key, out in (("id", by_id), ("uri", by_uri)):
        if key in t.column_names:
            for k, lab in zip(t[key].to_pylist(), labels):
                if k is not None and lab:
                    out[str(k)] = lab
    return by_id, by_uri


def predicted(row: dict) -> str | None:
    """What the filter made of a row: its category when inside the threshold, else natural
    (None: never scored, e.g. rejected before the embedding stage)."""
    m = row["nonnatural_margin"]
    if m is None:
        return None
    return row["nonnatural_category"] if m < 0 else "natural"


def _prop(k: int, n: int) -> dict:
    return {"value": k / n if n else None, "k": k, "n": n, "ci95": list(wilson(k, n)) if n else None}


def labelled_metrics(rows: list[dict], by_id: dict, by_uri: dict, categories: list[str]) -> dict:
    """False rejection of labelled naturals, recall and precision per category, measured
    on the user's labels; rows the labels and the filter disagree on."""
    pairs, unscored = [], 0
    for r in rows:
        label = by_id.get(r["id"]) or by_uri.get(r["uri"])
        got = predicted(r)
        if got is None:
            unscored += 1
            continue
        pairs.append((label, got, r))
    nat = [(lab, got) for lab, got, _ in pairs if lab == "natural"]
    unw = [(lab, got) for lab, got, _ in pairs if lab != "natural"]
    out = {"n_labelled": len(by_id) + len(by_uri), "n_matched": len(rows), "n_unscored": unscored,
           "natural_frr": _prop(sum(g != "natural" for _, g in nat), len(nat)),
           "recall": _prop(sum(g != "natural" for _, g in unw), len(unw)),
           "unwanted_share": _prop(len(unw), len(pairs)),
           "categories": {}, "unknown_labels": sorted({lab for lab, _, _ in pairs} - {"natural", *categories})}
    for c in categories:
        mine = [g for lab, g, _ in pairs if lab == c]
        pred = [lab for lab, g, _ in pairs if g == c]
        out["categories"][c] = {"recall": _prop(sum(g != "natural" for g in mine), len(mine)),
                                "precision": _prop(sum(lab == c for lab in pred), len(pred))}
    out["disagreements"] = [{**r, "label": lab, "predicted": got} for lab, got, r in pairs
                            if (lab == "natural") != (got == "natural")][:100]
    return out


# --------------------------------------------------------------------------- report

def build(cfg: PipelineConfig, labels: str | None = None, label_sample: int = 0, per_category: int = 8) -> dict:
    fs, root = mio.filesystem(cfg.output, cfg.storage)
    try:
        summary = mio.read_run_summary(fs, root, "examples-report", cfg.output)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fit = summary.get("examples")
    stage = mio.join(root, "stages", "filter")
    if not fit or not mio.is_committed(fs, stage):
        raise ConfigError(f"examples-report: the run in {cfg.output} has no non-natural filter "
                          "(set examples.path and run it to the filter stage)")
    files = sorted(p for p in fs.find(stage) if p.endswith(".parquet"))
    by_id, by_uri = read_labels(labels, cfg) if labels else ({}, {})
    got = scan(files, fs, per_category, (set(by_id), set(by_uri)), label_sample, cfg.run.seed)
    categories = sorted(fit["thresholds"])
    report = {
        "run": cfg.output, "model_id": fit.get("model_id"), "method": fit["method"], "target_frr": fit["target_frr"],
        "chosen": fit.get("chosen", fit["method"]), "why": fit.get("why"),
        "small_categories": fit.get("small_categories") or {}, "warnings": fit.get("warnings") or [],
        "thresholds": fit["thresholds"], "n_examples": fit["n_examples"],
        "cross_validation": fit.get("cross_validation"), "note": fit.get("note"),
        "corpus": {"rows": got["n_rows"], "scored": got["n_scored"],
                   "categories": {c: got["stats"].get(c, {"scored": 0, "inside": 0}) for c in categories}},
        "labels": labelled_metrics(got["labelled"], by_id, by_uri, categories) if labels else None,
        "nearest": {c: {side: [{k: r[k] for k in ("id", "uri", "nonnatural_margin", "nonnatural_score", "reason")}
                               for r in got[side].get(c, [])] for side in ("inside", "outside")} for c in categories},
    }
    cv = (report["cross_validation"] or {}).get(report["chosen"])
    inside = sum(v.get("inside", 0) for v in report["corpus"]["categories"].values())
    if cv and cv.get("natural_frr_ci95") and inside:
        # At most every scored row is natural: the 95% upper bound of the natural
        # false-rejection rate times the scored rows bounds the false rejections.
        worst = cv["natural_frr_ci95"][1] * got["n_scored"]
        report["corpus"]["false_rejections_upper_estimate"] = round(worst, 1)
        report["corpus"]["precision_lower_estimate"] = round(max(0.0, 1 - worst / inside), 4)
    out = mio.join(root, "examples_report")
    fs.makedirs(out, exist_ok=True)
    if label_sample:
        with fs.open(mio.join(out, "label_sample.csv"), "wb") as f:
            f.write(sample_csv(got["sample"]).encode())
    with fs.open(mio.join(out, "report.json"), "wb") as f:
        f.write(json.dumps(report, indent=2, sort_keys=True).encode())
    pictures = [r for side in ("inside", "outside") for rows in got[side].values() for r in rows]
    pictures += [*(report["labels"] or {}).get("disagreements", []), *got["sample"]]
    images = thumbs.thumbnails(thumbs.reasons_by_uri(pictures), cfg.storage, cfg.validate_,
                               bytes_column=cfg.input.bytes_column)
    page = render(report, got, {u: src for u, (src, _) in images.items()}, bool(label_sample))
    with fs.open(mio.join(out, "index.html"), "wb") as f:
        f.write(page.encode())
    report["files"] = {"json": mio.to_uri(fs, mio.join(out, "report.json")),
                       "html": mio.to_uri(fs, mio.join(out, "index.html"))}
    return report


def sample_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["id", "uri", "predicted", "nonnatural_category", "nonnatural_score", "nonnatural_margin", "label"])
    for r in rows:  # every cell safe to open in a spreadsheet (no formula runs)
        w.writerow([spreadsheet_safe(v) for v in (
            r["id"], r["uri"], predicted(r), r["nonnatural_category"], f"{r['nonnatural_score']:.5f}",
            f"{r['nonnatural_margin']:.5f}", "")])
    return buf.getvalue()


def _fmt(p: dict | None) -> str:
    if not p or p.get("value") is None:
        return "n/a"
    lo, hi = p["ci95"]
    return f"{p['value']:.3f} ({p['k']}/{p['n']}; 95% CI {lo:.3f}-{hi:.3f})"


def _cv_prop(value, ci, k_n: str = "") -> str:
    if value is None:
        return "n/a"
    return f"{value:.3f}{' ' + k_n if k_n else ''} (95% CI {ci[0]:.3f}-{ci[1]:.3f})"


def _figure(r: dict, src: str | None, extra: str = "") -> str:
    name = html.escape((r["uri"] or "").rsplit("/", 1)[-1])
    img = f'<img src="{src}" alt="{name}">' if src else '<div class="missing">unreadable</div>'
    why = f"<br>{html.escape(r['reason'])}" if r.get("reason") else ""
    return (f'<figure>{img}<figcaption>{name}<br>margin {r["nonnatural_margin"]:+.4f} score '
            f'{r["nonnatural_score"]:.3f}{why}{extra}</figcaption></figure>')


def render(report: dict, got: dict, src: dict, with_sample: bool) -> str:
    e = html.escape
    parts = [f"<h1>Non-natural filter: {e(report['chosen'])}</h1>",
             f"<p>examples.method {e(report['method'])}" + (f": {e(report['why'])}" if report.get("why") else "")
             + "</p>", *(f"<p class=warn>warning: {e(w)}</p>" for w in report["warnings"]),
             f"<p>Model {e(str(report['model_id']))}; thresholds aim at a natural false-rejection rate of "
             f"{report['target_frr']:g}. Corpus: {report['corpus']['rows']} rows, {report['corpus']['scored']} scored.</p>"]
    if report.get("note"):
        parts.append(f"<p class=note>{e(report['note'])}</p>")
    cv = report.get("cross_validation") or {}
    parts.append("<h2>Cross-validation on the example bank</h2><table><tr><th>method</th><th>category</th>"
                 "<th>examples</th><th>recall</th><th>precision (bank mix)</th></tr>")
    for m, r in cv.items():
        for c, v in r["categories"].items():
            of = f"of {v.get('n_predicted')}"
            parts.append(f"<tr><td>{e(m)}</td><td>{e(c)}</td><td>{v['n']}</td>"
                         f"<td>{_cv_prop(v['recall'], v['ci95'])}</td>"
                         f"<td>{_cv_prop(v.get('precision'), v.get('precision_ci95'), of)}</td></tr>")
        parts.append(f"<tr><td>{e(m)}</td><td><b>natural false rejection</b></td><td>{r['natural_n']}</td>"
                     f"<td colspan=2>{_cv_prop(r['natural_frr'], r['natural_frr_ci95'])}</td></tr>")
    parts.append("</table>")
    parts.append("<h2>Thresholds and the corpus near them</h2><table><tr><th>category</th><th>threshold</th>"
                 "<th>scored</th><th>rejected</th>" + "".join(f"<th>within {d} inside / outside</th>" for d in BANDS)
                 + "</tr>")
    for c, t in report["thresholds"].items():
        st = report["corpus"]["categories"][c]
        parts.append(f"<tr><td>{e(c)}</td><td>{t}</td><td>{st['scored']}</td><td>{st['inside']}</td>"
                     + "".join(f"<td>{st.get(f'inside_within_{d}', 0)} / {st.get(f'outside_within_{d}', 0)}</td>"
                               for d in BANDS) + "</tr>")
    parts.append("</table>")
    if "precision_lower_estimate" in report["corpus"]:
        parts.append(f"<p>At most {report['corpus']['false_rejections_upper_estimate']} of the rejections are natural "
                     f"images (upper CV bound of the false-rejection rate x scored rows): precision &ge; "
                     f"{report['corpus']['precision_lower_estimate']}.</p>")
    lab = report.get("labels")
    if lab:
        parts.append(f"<h2>On your labelled sample</h2><p>{lab['n_matched']} labelled rows found in the run "
                     f"({lab['n_unscored']} never scored).</p><ul>"
                     f"<li>natural false rejection: {_fmt(lab['natural_frr'])}</li>"
                     f"<li>recall of unwanted images: {_fmt(lab['recall'])}</li>"
                     f"<li>unwanted share of the sample: {_fmt(lab['unwanted_share'])}</li>")
        for c, v in lab["categories"].items():
            parts.append(f"<li>{e(c)}: recall {_fmt(v['recall'])}, precision {_fmt(v['precision'])}</li>")
        parts.append("</ul>")
        if lab["disagreements"]:
            parts.append("<h3>Where your labels and the filter disagree</h3><div class=grid>")
            parts += [_figure(r, src.get(r["uri"]), f"<br>label {e(r['label'])}, filter {e(r['predicted'])}")
                      for r in lab["disagreements"]]
            parts.append("</div>")
    parts.append("<h2>Corpus images closest to each threshold</h2>")
    for c in report["thresholds"]:
        for side, title in (("inside", "just inside (rejected)"), ("outside", "just outside (kept)")):
            rows = got[side].get(c, [])
            parts.append(f"<h3 id='{e(c)}-{side}'>{e(c)}: {title}</h3><div class=grid>")
            parts += [_figure(r, src.get(r["uri"])) for r in rows] or ["<p>none</p>"]
            parts.append("</div>")
    if with_sample:
        parts.append("<h2>Sample to label (label_sample.csv)</h2><div class=grid>")
        parts += [_figure(r, src.get(r["uri"]), f"<br>filter: {e(str(predicted(r)))}") for r in got["sample"]]
        parts.append("</div>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
             "padding:3px 8px}.grid{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;width:170px;font-size:11px}"
             "img{max-width:160px;max-height:160px}.missing{width:160px;height:100px;background:#eee}"
             ".warn{background:#fff4d6;border-left:4px solid #e0a800;padding:4px 8px}")
    return (f"<!doctype html><html><head><meta charset=utf-8><title>biocurate examples report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")


def run_config(config: str | None, output: str | None, prog: str = "examples-report") -> PipelineConfig:
    """The config given, else the one the run in ``output`` recorded (``prog`` names the
    report in the one-line errors)."""
    if config or not output:
        if not config:
            raise ConfigError(f"{prog}: give --config or --output (the run directory)")
        return load_config(config, {"output": output} if output else {})
    try:
        fs, root = mio.filesystem(output)
        with fs.open(mio.join(root, "summary.json"), "rb") as f:
            recorded = json.loads(f.read())["config"]
    except (OSError, KeyError, ValueError, TypeError):
        raise ConfigError(f"{prog}: {output} has no summary.json of a finished run "
                          "(run the pipeline first, or give --config)") from None
    try:
        return PipelineConfig.model_validate({**recorded, "output": output})
    except ValueError as e:
        raise ConfigError(f"{prog}: the config recorded in {output} no longer validates: "
                          f"{str(e).splitlines()[0]}; give --config") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = run_config(args.config, args.output)
        report = build(cfg, args.labels or cfg.examples.labels, args.label_sample, args.per_category)
    except ConfigError as e:
        print(f"biocurate: {e}", file=sys.stderr)
        return 2
    lab = report["labels"]
    extra = f"; labelled natural FRR {_fmt(lab['natural_frr'])}" if lab else ""
    print(f"biocurate: examples report in {report['files']['html']}{extra}")
    for line in report["warnings"]:
        print(f"biocurate: warning: {line}")
    return 0
