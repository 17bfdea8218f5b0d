"""biocurate dedup-report: the pure parts on hand-computed inputs, the whole report on a
hand-built finished run (no Ray), and ``check_dedup_report`` for a real run (called here
on a small run of real photos and their edited copies, and by tests/test_neardup.py)."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from PIL import Image

from manifests import io as mio
from pipeline import dedup_report as dr
from manifests.config import ConfigError, load_config
from stages.kernels import near_dedup as kn
from stages.kernels.examples import wilson

# --------------------------------------------------------------------------- pure parts


def test_histogram_bins_split_exactly_at_the_threshold():
    edges = dr.hist_edges(0.6, 0.1)
    assert len(edges) == 51 and edges[0] == pytest.approx(0.5) and edges[-1] == pytest.approx(1.0)
    assert edges[10] == 0.6  # the threshold is an edge
    below32 = float(np.nextafter(np.float32(0.6), np.float32(0)))  # a float32 near miss just under it
    v = [0.5, 0.59999, below32, 0.6, float(np.float32(0.6)), 0.605, 1.0, 1.0000001, 0.4, np.nan]
    counts, below, above = dr.bin_counts(np.array(v), edges)
    assert below == 1 and above == 0 and counts.sum() == 8
    assert counts[0] == 1 and counts[9] == 2 and counts[10] == 3 and counts[49] == 2
    # a threshold off the 0.01 grid is still an edge; the range ends at or just past 1
    e = dr.hist_edges(0.655, 0.1)
    assert 0.655 in e.tolist() and e[0] == pytest.approx(0.555) and 1.0 <= e[-1] < 1.01
    assert len(dr.hist_edges(0.75, 0.0)) == 26  # margin 0: [t, 1]
    g = dr.grid(0.6, 0.1)
    assert g[0] == pytest.approx(0.5) and g[-1] == 1.0 and len(g) == 51 and 0.6 in g.tolist()


def test_precision_recall_with_wilson_intervals():
    cos = np.array([0.9, 0.65, 0.59, 0.3, np.nan, 0.7])
    ham = np.array([2, 30, 5, 40, 6, -1])
    truth = np.array([1, 1, 1, 0, 1, 0], bool)
    pred = dr.predict(cos, ham, 0.6, 8)
    assert pred.tolist() == [True, True, True, False, True, True]
    m = dr.metrics(pred, truth)
    assert (m["tp"], m["fp"], m["fn"], m["tn"]) == (4, 1, 0, 1)
    assert m["precision"]["value"] == pytest.approx(0.8) and m["recall"]["value"] == 1.0
    # Wilson by hand: p=0.8, n=5, z=1.96 -> centre 0.66965, half-width 0.29412
    assert m["precision"]["ci95"] == pytest.approx([0.3755, 0.9638], abs=1e-3)
    assert m["recall"]["ci95"] == pytest.approx(list(wilson(4, 4)), abs=1e-6)
    assert m["f1"] == pytest.approx(2 * 4 / (2 * 4 + 1))
    # cosine only at 0.7: rows 0 and 5
    m = dr.metrics(dr.predict(cos, ham, 0.7, None), truth)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 1, 3)
    # nothing predicted: precision undefined, not 0
    m = dr.metrics(np.zeros(6, bool), truth)
    assert m["precision"]["value"] is None and m["precision"]["ci95"] is None and m["f1"] == 0
    # the grid: precision 1 from 0.71 (the distinct pair at 0.7 drops out); recall 3/4 (0.65 lost)
    rows = [{"threshold": float(t), **dr.metrics(dr.predict(cos, ham, float(t), 8), truth)}
            for t in dr.grid(0.6, 0.1)]
    best = dr.best_threshold(rows)
    assert best["precision"]["value"] == 1.0 and best["tp"] == 3
    assert best["tied_range"] == [pytest.approx(0.71), 1.0] and best["threshold"] == 1.0
    # no threshold reaches precision 1: the highest precision, then F1
    rows = [{"threshold": 0.5, **dr.metrics(np.array([1, 1, 1, 1, 0, 0], bool), truth)},
            {"threshold": 0.6, **dr.metrics(np.array([1, 1, 0, 1, 0, 0], bool), truth)}]
    assert dr.best_threshold(rows)["threshold"] == 0.5  # precision 3/4 against 2/3
    assert dr.best_threshold([{"threshold": 0.5, **dr.metrics(np.zeros(6, bool), truth)}]) is None
    hrows = [{"max_hamming": h, **dr.metrics(dr.predict(cos, ham, 0.95, h), truth)} for h in range(25)]
    best = dr.best_threshold(hrows, "max_hamming")  # 6..24 find three (the fourth is 30 apart): the lowest
    assert best["max_hamming"] == 6 and best["tied_range"] == [6, 24] and best["tp"] == 3


def test_label_parsing():
    text = ("label,note,id_b,id_a\n1,x,b,a\n0,,c,a\nyes,,a,b\nno,,a,b\n,,d,e\nduplicate,,c,c\n"
            "distinct,,f,e\nTRUE,,z,a\n")
    pairs, counts = dr.read_label_rows(text)
    assert sorted(pairs) == [("a", "c", False), ("a", "z", True), ("e", "f", False)]
    assert counts == {"rows": 8, "unlabelled": 1, "self_pairs": 1, "repeated": 2, "conflicting": 1}
    # no header: the first three columns
    pairs, _ = dr.read_label_rows("a,b,1\nc,d,0\n")
    assert pairs == [("a", "b", True), ("c", "d", False)]
    with pytest.raises(ConfigError, match="line 2"):
        dr.read_label_rows("id_a,id_b,label\na,b,maybe\n")
    with pytest.raises(ConfigError, match="header"):
        dr.read_label_rows("x,y,z\na,b,1\n")
    assert dr.read_label_rows("") == ([], {"rows": 0, "unlabelled": 0, "self_pairs": 0, "repeated": 0,
                                           "conflicting": 0})
    # ids not in the run are counted, not fatal
    rows = {"a": {"phash": 1}, "b": {"phash": 3}}
    got = dr.labelled_report([("a", "b", True), ("a", "nope", True), ("x", "y", False)], {"rows": 3}, rows,
                             np.array([np.nan] * 3), np.array([1, -1, -1]), None, 8, 0.1, None, [])
    assert got["pairs_missing"] == 2 and got["ids_missing"] == 3 and got["missing_ids"] == ["nope", "x", "y"]
    assert got["pairs_scored"] == 1 and got["at_run"]["tp"] == 1 and got["at_run"]["recall"]["n"] == 1
    # a spreadsheet-safe id from label_pairs.csv maps back
    assert dr.unquote_id("'=x", {"=x"}) == "=x" and dr.unquote_id("'abc", {"abc"}) == "'abc"


# --------------------------------------------------------------------------- a hand-built run (no Ray)

EVIL_ID = '=HYPERLINK("http://x","y")'
EVIL_NAME = "<img src=x onerror=alert(1)>.jpg"


def _commit(path: Path, table: pa.Table) -> None:
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-0.parquet")
    (path / mio.SUCCESS).write_text("{}")


def _unit(*xs) -> np.ndarray:
    v = np.zeros(6)
    for i, x in enumerate(xs):
        v[i] = x
    return v


def fake_run(tmp_path: Path) -> tuple[Path, dict]:
    """A finished run as near_dedup writes it: a (seed 0) corpus of 7 images; a-b cosine
    0.905 and a-c 0.625 found at threshold 0.6, c-b 0.566 and a-d 0.555 near misses, a-g a
    perceptual pair 3 bits apart (g has no embedding); e, f distinct."""
    imgs = tmp_path / "images"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    names = {"a": "a.jpg", "b": "b.jpg", EVIL_ID: EVIL_NAME, "d": "d.jpg", "e": "e.jpg", "f": "f.jpg", "g": "g.jpg"}
    uris = {}
    for i, n in names.items():
        arr = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
        Image.fromarray(arr).save(imgs / n, "JPEG")
        uris[i] = str(imgs / n)
    mean = np.array([0.5, -1, 2, 0.1, 0, 3], np.float32)
    c = EVIL_ID
    v = {"a": _unit(1), "b": _unit(0.905, np.sqrt(1 - 0.905**2)), c: _unit(0.625, 0, np.sqrt(1 - 0.625**2)),
         "d": _unit(0.555, 0, 0, np.sqrt(1 - 0.555**2)), "e": _unit(0, 0, 0, 0, 1), "f": _unit(0, 0, 0, 0, 0, 1)}
    emb = {i: (x * (1 + k) + mean).astype(np.float32) for k, (i, x) in enumerate(v.items())}  # scaled, shifted
    phash = {i: int(h) for i, h in zip(names, rng.integers(0, 2**64, len(names), dtype=np.uint64))}
    phash["g"] = phash["a"] ^ 0b10110  # 3 bits
    out = tmp_path / "run"
    xs = kn.center_normalize(np.stack(list(emb.values())), mean)
    cos = {(a, b): float(xs[i] @ xs[j]) for i, a in enumerate(emb) for j, b in enumerate(emb)}
    pairs = [("g1", "a", "b", "semantic", cos["a", "b"], "found"), ("g1", "a", c, "semantic", cos["a", c], "found"),
             ("g1", "a", "g", "perceptual", 1 - 3 / 64, "found"), (None, c, "b", "semantic", cos[c, "b"], "near_miss"),
             (None, "a", "d", "semantic", cos["a", "d"], "near_miss"),
             ("g1", "b", "a", "semantic", cos["a", "b"], "removal"),
             ("g1", "g", "a", "perceptual", 1 - 3 / 64, "removal")]
    cols = list(zip(*pairs))
    _commit(out / "stages" / "near_dedup.pairs", pa.table({
        "group": pa.array(cols[0], pa.string()), "id_a": pa.array(cols[1], pa.string()),
        "id_b": pa.array(cols[2], pa.string()), "detector": pa.array(cols[3], pa.string()),
        "similarity": pa.array(cols[4], pa.float32()), "kind": pa.array(cols[5], pa.string())}))
    _commit(out / "stages" / "near_dedup.centre", pa.table({"model_id": ["mobilenet_v2_imagenet@x"],
                                                           "mean": [mean.tolist()]}))
    _commit(out / "stages" / "embed.mobilenet_v2_imagenet", pa.table({
        "id": list(emb), "embedding": pa.array([e.tolist() for e in emb.values()], pa.list_(pa.float32()))}))
    removed = {"b", "g"}
    for name, ids in (("curated", [i for i in names if i not in removed]), ("rejected", sorted(removed))):
        _commit(out / name, pa.table({"id": ids, "uri": [uris[i] for i in ids],
                                      "reason": [None if name == "curated" else "semantic_duplicate" for _ in ids],
                                      "phash": pa.array([phash[i] for i in ids], pa.uint64())}))
    cfg = load_config(None, {"input.path": str(imgs), "output": str(out),
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}]})
    summary = {"config": cfg.dump(), "near_dedup": {
        "semantic": {"threshold": 0.6, "model": "mobilenet_v2_imagenet", "centred": True, "pairs": 2},
        "perceptual": {"pairs": 1}, "policy": "direct", "removed": 2,
        "removed_by_policy": {"direct": 2, "component": 3},
        "groups": 1, "members": 4, "alive": 7}}
    (out / "summary.json").write_text(json.dumps(summary))
    return out, {"cos": cos, "phash": phash, "uris": uris}


def _labels_file(path: Path, rows: list) -> str:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id_a", "id_b", "label"])
        w.writerows(rows)
    return str(path)


def test_report_on_a_hand_built_run(tmp_path, capsys):
    from pipeline.run import main

    out, info = fake_run(tmp_path)
    c = EVIL_ID
    labels = _labels_file(tmp_path / "labels.csv", [
        ("a", "b", 1), ("a", c, 0), ("a", "d", 1), ("g", "a", 1), ("e", "f", "no"), ("a", "missing-id", 1),
        ("b", "a", 1), (c, c, 1), ("d", "e", ""), ("e", "d", 1), ("d", "e", 0)])
    assert main(["dedup-report", "--output", str(out), "--labels", labels, "--per-side", "4",
                 "--label-sample", "3"]) == 0
    assert "dedup_report/index.html" in capsys.readouterr().out
    rep = json.loads((out / "dedup_report" / "report.json").read_text())
    assert rep["threshold"] == 0.6 and rep["max_hamming"] == 8 and rep["policy"] == "direct"
    assert rep["removed_by_policy"] == {"direct": 2, "component": 3}
    assert rep["pairs"]["found"] == {"semantic": 2, "perceptual": 1} and rep["pairs"]["near_miss"] == 2
    assert rep["pairs"]["removal"] == {"semantic": 1, "perceptual": 1} and rep["pairs"]["groups"] == 1
    h = rep["semantic_histogram"]
    assert sum(h["found"]) == 2 and sum(h["near_miss"]) == 2
    assert h["found"][40] == 1 and h["found"][12] == 1 and h["near_miss"][6] == 1 and h["near_miss"][5] == 1
    assert rep["hamming_histogram"]["found"][3] == 1 and sum(rep["hamming_histogram"]["found"]) == 1
    near = rep["nearest"]
    assert [p["id_b"] for p in near["above"]] == [c, "b"] and [p["id_a"] for p in near["below"]] == [c, "a"]
    assert near["above"][0]["uri_b"].endswith(EVIL_NAME) and near["loose"][0]["hamming"] == 3
    lab = rep["labels"]
    assert (lab["pairs"], lab["duplicates"], lab["distinct"]) == (6, 4, 2)
    assert (lab["pairs_missing"], lab["ids_missing"], lab["missing_ids"]) == (1, 1, ["missing-id"])
    assert (lab["skipped_unlabelled"], lab["skipped_self_pairs"], lab["skipped_repeated"],
            lab["skipped_conflicting"]) == (1, 1, 2, 1)
    assert lab["pairs_scored"] == 5 and lab["without_embedding"] == 1 and lab["notes"] == []  # g
    # at 0.6 / 8: a-b and a-g found, a-c a false positive, a-d missed
    at = lab["at_run"]
    assert (at["tp"], at["fp"], at["fn"], at["tn"]) == (2, 1, 1, 1)
    assert at["precision"]["ci95"] == pytest.approx(list(wilson(2, 3)), abs=1e-6)
    b = lab["best_threshold"]
    assert b["precision"]["value"] == 1.0 and b["tp"] == 2 and b["tied_range"] == [pytest.approx(0.63), 0.9]
    grid = {round(r["threshold"], 2): r for r in lab["threshold_grid"]}
    assert grid[0.55]["tp"] == 3 and grid[0.55]["fp"] == 1 and grid[0.91]["tp"] == 1
    assert lab["histogram"]["duplicates"][40] == 1 and lab["histogram"]["distinct"][12] == 1
    assert lab["best_max_hamming"]["max_hamming"] == 3
    dis = {frozenset((d["id_a"], d["id_b"])): d for d in lab["disagreements"]}
    assert set(dis) == {frozenset(("a", c)), frozenset(("a", "d"))}
    assert dis[frozenset(("a", c))]["label"] is False and dis[frozenset(("a", c))]["predicted"] is True
    dis = {"d": dis[frozenset(("a", "d"))]}
    assert dis["d"]["cosine"] == pytest.approx(info["cos"]["a", "d"], abs=1e-5) and dis["d"]["hamming"] > 8
    # the page: every pair's two images as data URIs, names escaped, the threshold marked
    page = (out / "dedup_report" / "index.html").read_text()
    assert page.count('<img src="data:image/jpeg;base64,') >= 2 * (2 + 2 + 1)
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;.jpg" in page
    assert "Best threshold: 0.9" in page and "missing-id" in page
    # label_pairs.csv: spreadsheet-safe, and read back as labels the ids match again
    text = (out / "dedup_report" / "label_pairs.csv").read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert len(rows) == 4 and all(not r["label"] for r in rows)
    assert any(r["id_b"] == "'" + EVIL_ID or r["id_a"] == "'" + EVIL_ID for r in rows)
    assert not any(cell.startswith("=") for r in rows for cell in r.values())
    for r in rows:
        r["label"] = "1" if "b" in (r["id_a"], r["id_b"]) and "a" in (r["id_a"], r["id_b"]) else "0"
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    (tmp_path / "filled.csv").write_text(buf.getvalue())
    assert main(["dedup-report", "--output", str(out), "--labels", str(tmp_path / "filled.csv")]) == 0
    lab = json.loads((out / "dedup_report" / "report.json").read_text())["labels"]
    assert lab["pairs"] == 4 and lab["pairs_missing"] == 0 and lab["at_run"]["tp"] == 1
    assert lab["at_run"]["fp"] == 1  # a-c


def test_report_without_the_centre_scores_by_phash_only(tmp_path):
    out, _ = fake_run(tmp_path)
    import shutil

    shutil.rmtree(out / "stages" / "near_dedup.centre")
    labels = _labels_file(tmp_path / "l.csv", [("a", "b", 1), ("a", "g", 1)])
    from pipeline.run import main

    assert main(["dedup-report", "--output", str(out), "--labels", labels]) == 0
    lab = json.loads((out / "dedup_report" / "report.json").read_text())["labels"]
    assert "no centring mean" in lab["notes"][0] and lab["without_embedding"] == 2 and lab["at_run"]["tp"] == 1


def test_report_of_a_perceptual_only_run(tmp_path):
    """Semantic matching skipped (no threshold for the model): Hamming histogram, loosest
    matches and the max_hamming grid only."""
    from pipeline.run import main

    out, _ = fake_run(tmp_path)
    s = json.loads((out / "summary.json").read_text())
    s["near_dedup"]["semantic"] = None
    s["near_dedup"]["semantic_skipped"] = "no semantic threshold for dedup model 'x'"
    (out / "summary.json").write_text(json.dumps(s))
    labels = _labels_file(tmp_path / "l.csv", [("a", "b", 1), ("a", "g", 1), ("e", "f", 0)])
    assert main(["dedup-report", "--output", str(out), "--labels", labels]) == 0
    rep = json.loads((out / "dedup_report" / "report.json").read_text())
    assert rep["threshold"] is None and rep["semantic_histogram"] is None and rep["nearest"]["above"] == []
    assert rep["hamming_histogram"]["found"][3] == 1 and rep["nearest"]["loose"][0]["hamming"] == 3
    lab = rep["labels"]
    assert "threshold_grid" not in lab and lab["at_run"]["tp"] == 1 and lab["at_run"]["fn"] == 1
    assert lab["best_max_hamming"]["max_hamming"] == 3 and lab["without_embedding"] == 3
    assert "no semantic threshold" in (out / "dedup_report" / "index.html").read_text()


def test_labelled_pairs_with_mirrored_embeddings(tmp_path):
    """near_dedup.flip: a pair scores the largest cosine over the plain and mirrored images."""
    from pipeline.run import main

    out, info = fake_run(tmp_path)
    s = json.loads((out / "summary.json").read_text())
    s["config"]["near_dedup"]["flip"] = True
    (out / "summary.json").write_text(json.dumps(s))
    labels = _labels_file(tmp_path / "l.csv", [("e", "f", 1), ("a", "b", 1)])
    assert main(["dedup-report", "--output", str(out), "--labels", labels]) == 0
    lab = json.loads((out / "dedup_report" / "report.json").read_text())["labels"]
    assert "embed.mobilenet_v2_imagenet_flip" in lab["notes"][0] and lab["at_run"]["fn"] == 1  # e-f: 0
    emb = pq.read_table(out / "stages" / "embed.mobilenet_v2_imagenet").to_pylist()
    vec = {r["id"]: r["embedding"] for r in emb}
    # f mirrored looks like e; a mirrored like nothing else
    _commit(out / "stages" / "embed.mobilenet_v2_imagenet_flip", pa.table({
        "id": ["f", "a"], "embedding": pa.array([vec["e"], vec["d"]], pa.list_(pa.float32()))}))
    assert main(["dedup-report", "--output", str(out), "--labels", labels]) == 0
    rep = json.loads((out / "dedup_report" / "report.json").read_text())
    lab = rep["labels"]
    assert rep["flip"] is True and lab["notes"] == [] and lab["at_run"]["tp"] == 2 and lab["at_run"]["fn"] == 0
    assert {round(r["threshold"], 2): r["tp"] for r in lab["threshold_grid"]}[0.99] == 1  # e-f at cosine 1
    grid = {round(r["threshold"], 2): r["tp"] for r in lab["threshold_grid"]}
    assert grid[0.9] == 2 and grid[0.91] == 1  # a-b keeps its plain 0.905 (a mirrored is d: 0.503)


def test_bad_output_is_one_line_exit_2(tmp_path, capsys):
    from pipeline.run import main

    assert main(["dedup-report", "--output", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no summary.json" in err
    out, _ = fake_run(tmp_path)
    s = json.loads((out / "summary.json").read_text())
    s["near_dedup"] = None
    (out / "summary.json").write_text(json.dumps(s))
    assert main(["dedup-report", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no near-duplicate stage" in err
    s["near_dedup"] = {"policy": "direct"}
    (out / "summary.json").write_text(json.dumps(s))
    assert main(["dedup-report", "--output", str(out), "--labels", str(tmp_path / "none.csv")]) == 2
    assert "cannot read" in capsys.readouterr().err
    (tmp_path / "bad.csv").write_text("id_a,id_b,label\na,b,perhaps\n")
    assert main(["dedup-report", "--output", str(out), "--labels", str(tmp_path / "bad.csv")]) == 2
    assert "line 2" in capsys.readouterr().err


# --------------------------------------------------------------------------- a real run


def check_dedup_report(out: Path, labels: list[tuple[str, str, int]]) -> dict:
    """``biocurate dedup-report`` on the finished run ``out`` with ``labels`` (plus one pair
    naming an id not in the run): the report agrees with the pairs table, the page shows
    the pairs' images, and every labelled pair the run found semantically is scored with
    the similarity the run measured. Returns report.json."""
    from pipeline.run import main

    labels = [*labels, (labels[0][0] if labels else "x", "not-in-this-run", 1)]
    path = _labels_file(out.parent / f"{out.name}_dedup_labels.csv", labels)
    assert main(["dedup-report", "--output", str(out), "--labels", path]) == 0
    rep = json.loads((out / "dedup_report" / "report.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    nd = summary["near_dedup"]
    files = sorted(str(p) for p in (out / "stages" / "near_dedup.pairs").rglob("*.parquet"))
    table = pads.dataset(files, format="parquet").to_table().to_pylist()
    t = rep["threshold"]
    assert t == nd["semantic"]["threshold"] and rep["policy"] == nd["policy"]
    assert rep["removed"] == nd["removed"] and rep["removed_by_policy"] == {
        k: nd["removed_by_policy"][k] for k in ("direct", "component")}
    found = {}
    for p in table:
        if p["kind"] == "found":
            found[p["detector"]] = found.get(p["detector"], 0) + 1
    assert rep["pairs"]["found"] == found
    assert rep["pairs"]["near_miss"] == sum(p["kind"] == "near_miss" for p in table)
    assert sum(rep["pairs"]["removal"].values()) == sum(p["kind"] == "removal" for p in table)
    sem_found = [p["similarity"] for p in table if p["kind"] == "found" and p["detector"] == "semantic"]
    near = [p["similarity"] for p in table if p["kind"] == "near_miss"]
    h = rep["semantic_histogram"]
    assert sum(h["found"]) + h["found_below_range"] == len(sem_found) and h["found_below_range"] == 0
    assert sum(h["near_miss"]) + h["near_miss_below_range"] == len(near)
    assert sum(h["found"][i] for i, e in enumerate(h["edges"][:-1]) if e >= t - 1e-9) == len(sem_found)
    per = [p for p in table if p["kind"] == "found" and p["detector"] == "perceptual"]
    assert sum(rep["hamming_histogram"]["found"]) == len(per)
    above, below = rep["nearest"]["above"], rep["nearest"]["below"]
    assert len(above) == min(8, len(sem_found)) and len(below) == min(8, len(near))
    assert all(p["similarity"] >= t for p in above) and all(p["similarity"] < t for p in below)
    assert [p["similarity"] for p in above] == sorted(p["similarity"] for p in above)
    if sem_found:
        assert above[0]["similarity"] == pytest.approx(min(sem_found), abs=1e-6)
    assert [p["similarity"] for p in below] == sorted((p["similarity"] for p in below), reverse=True)
    page = (out / "dedup_report" / "index.html").read_text()
    shown = [p for k in ("above", "below", "loose") for p in rep["nearest"][k]]
    in_run = sum(bool(p[f"uri_{s}"]) for p in shown for s in "ab")
    assert page.count('<img src="data:image/jpeg;base64,') >= in_run > 0
    lab = rep["labels"]
    unique = {tuple(sorted((a, b))) for a, b, _ in labels if a != b}
    assert lab["pairs"] == len(unique) and lab["ids_missing"] >= 1 and "not-in-this-run" in lab["missing_ids"]
    at = lab["at_run"]
    assert at["tp"] + at["fn"] + at["fp"] + at["tn"] == lab["pairs_scored"] == lab["pairs"] - lab["pairs_missing"]
    assert lab["notes"] == []
    assert lab["best_threshold"] is None or lab["best_threshold"]["precision"]["value"] is not None
    # the labelled pairs' cosines, recomputed from the embeddings, are the run's own
    fs, root = mio.filesystem(str(out))
    run_sim = {tuple(sorted((p["id_a"], p["id_b"]))): p["similarity"] for p in table
               if p["detector"] == "semantic" and p["kind"] in ("found", "near_miss")}
    pairs = [(a, b, bool(lab_)) for a, b, lab_ in labels if tuple(sorted((a, b))) in run_sim]
    if pairs:
        vecs, note = dr.lookup_embeddings(fs, root, rep["model"], {i for a, b, _ in pairs for i in (a, b)})
        mean, _ = dr.read_centre(fs, root)
        rows = dr.lookup_rows(fs, root, {i for a, b, _ in pairs for i in (a, b)})
        flips = None
        if summary["config"]["near_dedup"].get("flip"):
            wanted = {i for a, b, _ in pairs for i in (a, b)}
            flips, fnote = dr.lookup_embeddings(fs, root, f"{rep['model']}_flip", wanted)
            assert fnote is None
        cos, ham = dr.score_pairs(pairs, rows, vecs, mean, nd["semantic"].get("centred", True), flips)
        assert note is None and (mean is not None or not nd["semantic"].get("centred", True))
        for (a, b, _), c in zip(pairs, cos):
            assert c == pytest.approx(run_sim[tuple(sorted((a, b)))], abs=2e-3), (a, b)
    hrun = {tuple(sorted((p["id_a"], p["id_b"]))): round((1 - p["similarity"]) * 64) for p in per}
    ppairs = [(a, b, True) for a, b, _ in labels if tuple(sorted((a, b))) in hrun]
    if ppairs:
        rows = dr.lookup_rows(fs, root, {i for a, b, _ in ppairs for i in (a, b)})
        _, ham = dr.score_pairs(ppairs, rows, {}, None, False)
        assert [hrun[tuple(sorted((a, b)))] for a, b, _ in ppairs] == ham.tolist()
    return rep
