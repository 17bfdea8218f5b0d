"""The non-natural filter on real photos and rendered non-natural images, with 20% of the
data in the example bank: which method ``examples.method: auto`` picks, and the held-out
natural false rejection, recall and F1 of both methods, for a realistic and a narrow bank.

Data (no network): the 65 photos of ``pipeline.testdata.images.photo_bank()`` (six sources), split
*by photo* per source, 20% to the bank (two random crops of each) and the rest held out
(the whole photo and one crop); seven rendered kinds (``pipeline.testdata.renders``: charts,
text pages, maps, drawings, screenshots, slides, documents), seeds 0..N/5-1 in the bank and
the rest held out. The narrow bank is three crops of each of five photos plus grey copies
(the bank the old min_distance default was chosen on) with the same unwanted examples,
held out on the other photos. Every image goes through ``stages.backbones.model_input`` and
the real ImageNet MobileNetV2; the filter is ``pipeline.examples.fit`` and the filter
stage's own scoring (``stages.filters.nonnatural_scores``). Also measured: the previous
min_distance thresholds (one per category, each the target quantile of the natural
examples' distances), cross-validated and held out.

    .venv/bin/python bench/examples_filter.py [--per-category 60] [--split-seed 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.testdata import renders, images  # noqa: E402
from manifests.config import load_config  # noqa: E402
from stages.kernels import examples as kx  # noqa: E402

CATEGORIES = ("chart", "text", "map", "drawing", "screenshot", "slide", "document")
NARROW = ("skimage/chelsea", "skimage/coffee", "sklearn/china", "skimage/rocket", "skimage/coins")


def embedder():
    from stages.backbones import load_backbone, model_input

    bb = load_backbone("mobilenet_v2_imagenet")

    def emb(images):
        out = []
        for i in range(0, len(images), 32):
            x = torch.from_numpy(np.stack([model_input(np.asarray(a)[..., :3], 224) for a in images[i:i + 32]]))
            with torch.no_grad():
                out.append(bb(x).numpy())
        return np.concatenate(out)

    return emb


def data(per_category: int, fraction: float, split_seed: int):
    emb = embedder()
    photos = images.photo_bank()
    rng = np.random.default_rng(split_seed)
    names = sorted(photos)
    in_bank = set()
    for src in sorted({images.photo_source(n) for n in names}):
        mine = [n for n in names if images.photo_source(n) == src]
        in_bank |= set(rng.choice(mine, int(round(fraction * len(mine))), replace=False).tolist())
    held_names = [n for n in names if n not in in_bank]
    bank_nat = [c for i, n in enumerate(sorted(in_bank)) for c in images.crops(photos[n], 2, 100 + i)]
    held_imgs = [v for i, n in enumerate(held_names) for v in (photos[n], *images.crops(photos[n], 1, 500 + i))]
    held_of = np.array([n for n in held_names for _ in range(2)])
    n_bank = int(round(fraction * per_category))
    rendered = {c: emb([renders.render(c, s) for s in range(per_category)]) for c in CATEGORIES}
    narrow = [c for i, n in enumerate(NARROW) for c in images.crops(photos[n], 3, i)]
    narrow += [np.stack([np.asarray(Image.fromarray(c).convert("L"))] * 3, -1) for c in narrow[::2]]
    unwanted = {c: v[:n_bank] for c, v in rendered.items()}
    held = {"natural": emb(held_imgs), **{c: v[n_bank:] for c, v in rendered.items()}}
    return ({"realistic": {"natural": emb(bank_nat), **unwanted}, "narrow": {"natural": emb(narrow), **unwanted}},
            {"realistic": held, "narrow": {**held, "natural": held["natural"][~np.isin(held_of, NARROW)]}},
            sorted(in_bank))


def held_out(rejected: dict[str, np.ndarray]) -> dict:
    fr, n_nat = int(rejected["natural"].sum()), len(rejected["natural"])
    tp = sum(int(v.sum()) for c, v in rejected.items() if c != "natural")
    n_un = sum(len(v) for c, v in rejected.items() if c != "natural")
    lo, hi = kx.wilson(fr, n_nat)
    return {"natural_frr": f"{fr}/{n_nat} = {fr / n_nat:.2%} (95% CI {lo:.3f}-{hi:.3f})",
            "recall": f"{tp}/{n_un} = {tp / n_un:.2%}", "f1": round(2 * tp / (2 * tp + fr + n_un - tp), 4),
            "per_category_recall": {c: f"{int(v.sum())}/{len(v)}" for c, v in rejected.items() if c != "natural"}}


def old_rule(bank: dict, held: dict, target: float) -> dict:
    """The previous min_distance thresholds: per category, the target quantile of the natural
    examples' distances to it; CV natural false rejection over the same source folds."""
    cats = [c for c in bank if c != "natural"]
    nat = bank["natural"]
    fold = kx.group_folds(kx.natural_groups(nat), 5, 0)
    k = 0
    for f in np.unique(fold):
        thr = {c: kx.distance_threshold(kx.min_cosine_distance(nat[fold != f], bank[c]), target) for c in cats}
        k += int(np.any([kx.min_cosine_distance(nat[fold == f], bank[c]) < thr[c] for c in cats], axis=0).sum())
    thr = {c: kx.distance_threshold(kx.min_cosine_distance(nat, bank[c]), target) for c in cats}
    rej = {c: np.any([kx.min_cosine_distance(x, bank[o]) < thr[o] for o in cats], axis=0) for c, x in held.items()}
    return {"cv_natural_frr": f"{k}/{len(nat)} = {k / len(nat):.1%}", "held_out": held_out(rej)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-category", type=int, default=60, help="Rendered images per kind (default 60).")
    ap.add_argument("--fraction", type=float, default=0.2, help="Share of photos and renders in the bank.")
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--target-frr", type=float, default=0.02)
    args = ap.parse_args()
    from pipeline.examples import fit, fit_method
    from stages.filters import nonnatural_scores

    t0 = time.time()
    banks, helds, bank_photos = data(args.per_category, args.fraction, args.split_seed)
    out = {"bank_photos": bank_photos, "embedding_s": round(time.time() - t0, 1)}
    cfg = load_config(None, {"input.path": "/tmp", "output": "/tmp/o", "examples.path": "/tmp/bank",
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}],
                             "examples.target_frr": args.target_frr})
    for name, bank in banks.items():
        held = helds[name]
        t = time.time()
        model, report = fit(cfg, bank)
        fit_s = round(time.time() - t, 1)
        res = {"n_examples": report["n_examples"], "natural_sources": report["natural_sources"],
               "chosen": report["chosen"], "why": report["why"], "fit_s": fit_s,
               "cv": {m: {"natural_frr": f"{r['natural_k']}/{r['natural_n']}", "recall": f"{r['recall_k']}/{r['recall_n']}"}
                      for m, r in report["cross_validation"].items()}}
        for m in ("min_distance", "probe"):
            mod = model if m == report["chosen"] else fit_method(bank, m, args.target_frr)[0]
            res[m] = held_out({c: nonnatural_scores(x, mod)[2] < 0 for c, x in held.items()})
        res["old_min_distance_rule"] = old_rule(bank, held, args.target_frr)
        out[name] = res
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
