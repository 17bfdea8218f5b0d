"""Example-based non-natural classification: kernels on hand-checked inputs, then both
methods on real images embedded with the real offline MobileNetV2 -- photographs shipped in
scikit-image / scikit-learn vs charts rendered by matplotlib and text pages (drawn with
Pillow; scanned pages shipped in scikit-image held out) -- with held-out images never in the
example bank."""

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

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

def _chart(seed: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    kind = seed % 4
    if kind == 0:
        ax.bar(range(6), rng.random(6), color=rng.random((6, 3)))
    elif kind == 1:
        for _ in range(3):
            ax.plot(np.cumsum(rng.normal(size=40)))
    elif kind == 2:
        ax.scatter(rng.random(60), rng.random(60), c=rng.random(60), s=20)
    else:
        ax.hist(rng.normal(size=300), bins=20, color=rng.random(3))
    ax.set_title(f"Figure {seed}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buf).convert("RGB"))


def _text_page(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (360, 480), (255, 255, 255) if seed % 2 else (246, 240, 225))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(11, 17)))
    y = 20
    while y < 450:
        words = " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9)))
                         for _ in range(rng.integers(4, 9)))
        d.text((20, y), words, fill=(20, 20, 20), font=font)
        y += int(rng.integers(16, 24))
    return np.asarray(img)


def _crops(a: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = a.shape[:2]
    out = []
    for _ in range(n):
        f = rng.uniform(0.6, 0.95)
        ch, cw = int(h * f), int(w * f)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(a[y : y + ch, x : x + cw])
    return out


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
    natural = [c for i, a in enumerate(bank_photos) for c in _crops(_rgb(a), 3, i)]
    # Natural examples also as grayscale copies (IR camera traps, old scans): without them a
    # gray photograph sits nearer the white-background drawings than the color examples.
    natural += [_rgb(np.asarray(Image.fromarray(c).convert("L"))) for c in natural[::2]]
    bank = {
        "natural": emb(natural),
        "chart": emb([_chart(s) for s in range(16)]),
        "text": emb([_text_page(s) for s in range(16)]),
    }
    held = {
        "natural": emb([c for i, a in enumerate(held_photos.values()) for c in _crops(a, 2, 50 + i)]),
        "chart": emb([_chart(s) for s in range(100, 110)]),
        "text": emb([_text_page(s) for s in range(100, 106)] + _crops(sd.page(), 2, 7) + _crops(sd.text(), 2, 8)),
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
