"""Example-based non-natural classification: kernels on hand-checked inputs, then both
methods on real images embedded with the real offline MobileNetV2 -- photographs shipped in
scikit-image / scikit-learn vs charts rendered by matplotlib and text pages (drawn with
Pillow; scanned pages shipped in scikit-image held out) -- with held-out images never in the
example bank."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import samples
from stages.kernels.examples import (cross_validate, distance_threshold, fit_probe, loo_min_distance,
                                     min_cosine_distance, probability_threshold, probe_with_threshold, wilson)


def test_wilson_interval_known_values():
    lo, hi = wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson(5, 10)
    assert (lo, hi) == (pytest.approx(0.2366, abs=1e-3), pytest.approx(0.7634, abs=1e-3))
    assert wilson(0, 0) == (0.0, 1.0)


def test_min_cosine_distance_and_leave_one_out():
    bank = np.array([[1, 0, 0], [0, 1, 0]], np.float32)
    x = np.array([[2, 0, 0], [1, 1, 0], [0, 0, 5]], np.float32)
    assert np.allclose(min_cosine_distance(x, bank), [0.0, 1 - 2 ** -0.5, 1.0], atol=1e-6)
    assert np.allclose(loo_min_distance(np.array([[1, 0], [1, 0.01], [0, 1]], np.float32)),
                       [1 - 1 / np.sqrt(1 + 1e-4)] * 2 + [1 - 0.01 / np.sqrt(1 + 1e-4)], atol=1e-6)


def test_thresholds_reject_the_target_fraction_of_naturals():
    d = np.linspace(0.1, 1.0, 100)
    t = distance_threshold(d, 0.05)
    assert np.mean(d < t) <= 0.05 and np.mean(d <= t) >= 0.05
    p = np.linspace(0, 1, 101)
    assert np.mean(p > probability_threshold(p, 0.02)) <= 0.02


def test_probe_separates_clusters():
    rng = np.random.default_rng(0)
    centers = {"natural": [1, 0, 0, 0], "chart": [0, 1, 0, 0], "text": [0, 0, 1, 0]}
    x = np.concatenate([np.array(c) + rng.normal(0, 0.2, (30, 4)) for c in centers.values()]).astype(np.float32)
    y = [c for c in centers for _ in range(30)]
    probe = fit_probe(x, y)
    assert probe.classes[0] == "natural"
    assert (np.array(probe.classes)[probe.proba(x).argmax(1)] == np.array(y)).mean() > 0.95


# --------------------------------------------------------------------------- real images

def _rgb(a):
    return np.stack([a] * 3, -1).astype(np.uint8) if a.ndim == 2 else a[..., :3]


@pytest.fixture(scope="module")
def embedded(photos):
    import skimage.data as sd

    from stages.backbones import load_backbone, model_input

    bb = load_backbone("mobilenet_v2_imagenet")

    def emb(images):
        x = torch.from_numpy(np.stack([model_input(_rgb(a), 224) for a in images]))
        return bb(x).numpy()

    bank_photos = [photos["chelsea"], photos["coffee"], photos["china"], photos["rocket"], sd.coins()]
    held_photos = {"cat": sd.cat(), "flower": photos["flower"], "astronaut": photos["astronaut"],
                   "camera": photos["camera"], "moon": sd.moon(), "grass": sd.grass()}
    natural = [c for i, a in enumerate(bank_photos) for c in samples.crops(_rgb(a), 3, i)]
    # Natural examples also as grayscale copies (IR camera traps, old scans): without them a
    # gray photograph sits nearer the white-background drawings than the color examples.
    natural += [_rgb(np.asarray(Image.fromarray(c).convert("L"))) for c in natural[::2]]
    bank = {
        "natural": emb(natural),
        "chart": emb([samples.chart_image(s) for s in range(16)]),
        "text": emb([samples.text_page(s) for s in range(16)]),
    }
    held = {
        "natural": emb([c for i, a in enumerate(held_photos.values()) for c in samples.crops(a, 2, 50 + i)]),
        "chart": emb([samples.chart_image(s) for s in range(100, 110)]),
        "text": emb([samples.text_page(s) for s in range(100, 106)] + samples.crops(sd.page(), 2, 7) + samples.crops(sd.text(), 2, 8)),
    }
    return bank, held


def test_both_methods_on_held_out_real_images(embedded):
    bank, held = embedded
    target = 0.05
    cats = ["chart", "text"]
    # method A: per category min distance, thresholds from the natural examples
    thr = {c: distance_threshold(min_cosine_distance(bank["natural"], bank[c]), target) for c in cats}

    def rejected_a(x):
        return np.any([min_cosine_distance(x, bank[c]) < thr[c] for c in cats], axis=0)

    probe, pthr = probe_with_threshold(bank, target)
    unwanted = [probe.classes.index(c) for c in cats]

    def rejected_b(x):
        return probe.proba(x)[:, unwanted].max(1) > pthr

    report = {}
    for m, rej in (("A_min_distance", rejected_a), ("B_linear_probe", rejected_b)):
        rec = {c: int(rej(held[c]).sum()) for c in cats}
        n_un = sum(len(held[c]) for c in cats)
        k_un = sum(rec.values())
        frr = int(rej(held["natural"]).sum())
        report[m] = {"recall": round(k_un / n_un, 3), "recall_ci95": [round(v, 3) for v in wilson(k_un, n_un)],
                     "per_category": {c: f"{rec[c]}/{len(held[c])}" for c in cats},
                     "natural_frr": round(frr / len(held["natural"]), 3),
                     "natural_frr_ci95": [round(v, 3) for v in wilson(frr, len(held["natural"]))]}
        assert k_un / n_un >= 0.8, (m, report[m])
    print("\nheld-out:", json.dumps(report))
    # The measurement that picks the default method: on natural photos never in the bank,
    # the min-distance method keeps its false rejections low; the probe, fitted to crops of
    # five photos, takes most new photos for drawings (it learns the examples, not 'natural').
    assert report["A_min_distance"]["natural_frr"] <= 0.25
    assert report["A_min_distance"]["natural_frr"] < report["B_linear_probe"]["natural_frr"]
    cv = cross_validate(bank, target, k=4)
    print("bank 4-fold CV:", json.dumps({m: {k: v for k, v in r.items() if k != "categories"} for m, r in cv.items()}))
    for m in ("A", "B"):
        assert cv[m]["recall"] >= 0.8 and cv[m]["natural_n"] == len(bank["natural"])
        for c in cats:
            v = cv[m]["categories"][c]
            assert v["n"] == len(bank[c]) and v["precision"] >= 0.8, (m, c, v)


@pytest.mark.slow
def test_pipeline_rejects_nonnatural_by_example(tmp_path, ray_local, photos):
    import skimage.data as sd

    from pipeline import plan
    from pipeline.config import load_config
    from tests.test_pipeline import check_invariant

    def save(path, a):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(samples.encode(Image.fromarray(_rgb(a)), "PNG" if path.suffix == ".png" else "JPEG"))

    bank = tmp_path / "examples"
    for s in range(12):
        save(bank / "chart" / f"c{s}.png", samples.chart_image(s))
        save(bank / "text" / f"t{s}.png", samples.text_page(s))
    natural = [c for i, n in enumerate(["chelsea", "coffee", "china", "rocket"]) for c in samples.crops(photos[n], 3, i)]
    natural += [c for c in samples.crops(sd.coins(), 3, 9)]
    for i, c in enumerate(natural):
        save(bank / "natural" / f"n{i}.jpg", c)
        if i % 2 == 0:  # gray copies too (see test_both_methods_on_held_out_real_images)
            save(bank / "natural" / f"n{i}_gray.jpg", np.asarray(Image.fromarray(_rgb(c)).convert("L")))
    corpus = tmp_path / "in"
    expect = {}
    held = {"cat": sd.cat(), "flower": photos["flower"], "astronaut": photos["astronaut"],
            "camera": photos["camera"], "moon": sd.moon(), "grass": sd.grass()}
    for name, a in held.items():
        save(corpus / f"{name}.jpg", a)
        expect[f"{name}.jpg"] = None
    for s in range(100, 104):
        save(corpus / f"chart{s}.png", samples.chart_image(s))
        expect[f"chart{s}.png"] = "chart"
        save(corpus / f"page{s}.png", samples.text_page(s))
        expect[f"page{s}.png"] = "text"
    out = tmp_path / "run"
    overrides = {"input.path": str(corpus), "output": str(out), "examples.path": str(bank),
                 "examples.target_frr": 0.05, "embed.models": [{"name": "mobilenet_v2_imagenet"}],
                 "quality.min_entropy": None}  # a sparse line chart is also "uniform"
    cfg = load_config(None, overrides)
    summary = plan.run(cfg)
    curated, rejected = check_invariant(out, [str(corpus / f) for f in expect])
    got = {u.rsplit("/", 1)[1]: r for u, r in {**curated, **rejected}.items()}
    for name, cat in expect.items():
        r = got[name]
        assert r["nonnatural_category"] is not None and r["nonnatural_score"] is not None
        if cat is not None:
            assert r["reason"] == "nonnatural" and r["stage"] == "filter", (name, r)
            assert f"'{cat}'" in r["detail"] and r["nonnatural_category"] == cat
    false_rejections = [n for n, c in expect.items() if c is None and got[n].get("reason") is not None]
    print("\nfalse rejections of held-out natural photos:", false_rejections,
          {n: got[n].get("detail") for n in false_rejections})
    # Measured: 2 of 6 (flower, camera: both nearer the 'text' pages than any of the 23
    # natural examples were, so below its threshold). The natural false-rejection rate is
    # only as good as the natural/ examples are representative; the report says so.
    assert len(false_rejections) <= 2, false_rejections
    ex = summary["examples"]
    assert ex["method"] == "min_distance" and set(ex["thresholds"]) == {"chart", "text"}
    assert ex["n_examples"]["chart"] == 12 and ex["examples_rejected"] == 0
    assert ex["cross_validation"]["min_distance"]["recall"] >= 0.8
    assert summary["rejected_by_stage"]["filter"] == {"nonnatural": 8 + len(false_rejections)}
    for r in got.values():  # the margin's sign is the decision
        assert (r["nonnatural_margin"] < 0) == (r.get("reason") == "nonnatural")
    check_examples_report(out, corpus, expect, got, false_rejections)
    # The bank shares the embedding cache: a changed threshold refits without embedding it again.
    import hashlib

    distinct = len({hashlib.sha256(f.read_bytes()).hexdigest() for f in bank.rglob("*.*")})  # 45 of 47 files
    assert ex["bank_embeddings"] == {"computed": distinct, "cached": 0}
    cfg = load_config(None, {**overrides, "examples.target_frr": 0.1})
    again = plan.run(cfg, resume=True)
    assert again["examples"]["bank_embeddings"] == {"computed": 0, "cached": distinct}
    assert "filter" in again["stages_run"] and "scan" in again["stages_reused"]


def check_examples_report(out, corpus, expect, got, false_rejections):
    """``biocurate examples-report`` on the finished run, with the user's labels of every
    corpus image: measured false rejection / recall / precision, the rows nearest each
    threshold, a label sample, and a page whose every thumbnail decodes."""
    import base64
    import csv
    import io
    import re

    from pipeline.run import main
    from stages.kernels.hashing import seeded_rank

    labels = out.parent / "labels.csv"
    labels.write_text("uri,label\n" + "".join(f"{corpus / n},{c or 'natural'}\n" for n, c in expect.items()))
    assert main(["examples-report", "--output", str(out), "--labels", str(labels), "--label-sample", "5",
                 "--per-category", "3"]) == 0
    rep = json.loads((out / "examples_report" / "report.json").read_text())
    lab = rep["labels"]
    assert lab["n_matched"] == len(expect) and lab["n_unscored"] == 0
    assert (lab["natural_frr"]["k"], lab["natural_frr"]["n"]) == (len(false_rejections), 6)
    assert (lab["recall"]["k"], lab["recall"]["n"]) == (8, 8)
    for c in ("chart", "text"):
        predicted_c = [n for n, r in got.items() if r.get("reason") == "nonnatural" and r["nonnatural_category"] == c]
        assert lab["categories"][c]["precision"]["n"] == len(predicted_c)
        assert lab["categories"][c]["precision"]["k"] == sum(expect[n] == c for n in predicted_c)
        assert rep["corpus"]["categories"][c]["inside"] == len(predicted_c)
        # the rows nearest the threshold, each side, are the ones a full sort finds
        mine = sorted((r["nonnatural_margin"], n) for n, r in got.items() if r["nonnatural_category"] == c)
        inside = [n for m, n in sorted(mine, key=lambda t: -t[0]) if m < 0][:3]
        outside = [n for m, n in mine if m >= 0][:3]
        assert [r["uri"].rsplit("/", 1)[1] for r in rep["nearest"][c]["inside"]] == inside
        assert [r["uri"].rsplit("/", 1)[1] for r in rep["nearest"][c]["outside"]] == outside
    assert {d["uri"].rsplit("/", 1)[1] for d in lab["disagreements"]} == set(false_rejections)
    for m in ("min_distance", "probe"):  # both methods, with precision
        cats = rep["cross_validation"][m]["categories"]
        assert all(v["precision"] is not None and v["n_predicted"] > 0 for v in cats.values())
    rows = list(csv.DictReader(io.StringIO((out / "examples_report" / "label_sample.csv").read_text())))
    ids = [r["id"] for r in got.values()]
    assert [r["id"] for r in rows] == [ids[i] for i in np.argsort(seeded_rank(0, ids), kind="stable")[:5]]
    assert all(r["label"] == "" and r["predicted"] in ("natural", "chart", "text") for r in rows)
    page = (out / "examples_report" / "index.html").read_text()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    assert len(srcs) >= 12 and "http://" not in page and "https://" not in page
    for s in srcs:
        assert s.startswith("data:image/jpeg;base64,")
        assert min(Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).size) > 10
    for c in ("chart", "text"):
        assert f"id='{c}-inside'" in page and f"id='{c}-outside'" in page
    # a run without the filter: a one-line error, exit 2
    assert main(["examples-report", "--output", str(out.parent / "nothing")]) == 2


def test_bank_as_a_uri_category_table(tmp_path):
    from pipeline.config import ConfigError, load_config
    from pipeline.examples import bank_rows

    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "bank.csv").write_text("uri,category\nimgs/a.png,chart\n/abs/n.jpg,natural\n"
                                             "s3://bkt/t.png, text\n,chart\n")
    cfg = load_config(None, {"input.path": str(tmp_path), "output": str(tmp_path / "o"), "examples.path": str(tmp_path / "b" / "bank.csv"),
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}]})
    rows = bank_rows(cfg)
    assert rows["uri"].to_pylist() == [str(tmp_path / "b" / "imgs" / "a.png"), "/abs/n.jpg", "s3://bkt/t.png"]
    assert rows["category"].to_pylist() == ["chart", "natural", "text"]
    (tmp_path / "b" / "bad.csv").write_text("path,category\na.png,chart\n")
    with pytest.raises(ConfigError, match="needs columns uri, category"):
        bank_rows(load_config(None, {"input.path": str(tmp_path), "output": str(tmp_path / "o"), "examples.path": str(tmp_path / "b" / "bad.csv"),
                                     "embed.models": [{"name": "mobilenet_v2_imagenet"}]}))


def test_cross_validation_confusion_counts():
    """Recall, precision and the natural false rejections per category add up, on separable
    categories with one natural example planted inside the 'chart' cluster (a mislabelled
    natural: it pulls chart's threshold down, and chart's recall with it)."""
    rng = np.random.default_rng(1)
    centers = {"natural": [1, 0, 0, 0], "chart": [0, 1, 0, 0], "text": [0, 0, 1, 0]}
    bank = {c: (np.array(v) + rng.normal(0, 0.05, (20, 4))).astype(np.float32) for c, v in centers.items()}
    bank["natural"][0] = bank["chart"][0] + 0.01
    cv = cross_validate(bank, 0.05, k=5)
    for m in ("A", "B"):
        r = cv[m]
        per = r["categories"]
        assert r["natural_n"] == 20 and per["chart"]["recall"] < 0.5
        assert sum(v["natural_false_rejections"] for v in per.values()) == round(r["natural_frr"] * 20)
        assert r["recall"] == pytest.approx((per["chart"]["recall"] + per["text"]["recall"]) / 2)
        for c in ("chart", "text"):
            right = round(per[c]["precision"] * per[c]["n_predicted"])  # c predicted as c
            assert right + per[c]["natural_false_rejections"] <= per[c]["n_predicted"]
            assert right <= round(per[c]["recall"] * 20)  # rejected as c <= rejected as anything
