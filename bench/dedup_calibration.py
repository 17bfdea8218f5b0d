"""Calibrating the near-duplicate defaults on real photos: the MobileNetV2 (ImageNet)
semantic threshold, pHash at max_hamming 8, and what ``near_dedup.flip`` costs.

Corpus: every photo of ``pipeline.testdata.images.photo_bank()`` (65 real photos from six packages;
39 Pexels interiors, several of one staged room from other angles: distinct photos of one
kind of subject, the hard negatives) plus, for each, the edits of ``images.edited_copies``
(JPEG q30, 50% resize, centre crop 85%, brightness 1.3, rotation 5 degrees, mirror,
caption: the target set) and three more (saturation 1.5, two JPEG generations q75 then q50,
a white border). Every item is stored as a JPEG file would be (originals q92, edits q90,
as in tests/test_neardup.py) and goes through the pipeline's own
``stages.validate.validate_image`` (DCT-scaled decode, its pHash) and
``stages.backbones.model_input`` + ``load_backbone`` (the embedding stage's input).

Similarity is the pipeline's: cosine of centred (corpus mean subtracted), L2-normalized
embeddings (``stages.kernels.near_dedup.center_normalize``). The mean is over the whole corpus
(originals and edits) as in a real run; ``--mean originals`` / ``none`` and the
sensitivity table show how much it matters. Flip-aware similarity (``near_dedup.flip``):
the model also embeds the horizontally mirrored input, and a pair counts at
max(cos(a, b), cos(a, flip(b)), cos(flip(a), b)).

Distinct pairs: every pair of items from two different photos (originals and edits: in a
corpus the edits are there too), and the original-vs-original subset. Left out of them and
reported on their own: ``SAME_SCENE``, scikit-image's stereo pair, which both detectors see
as one photo (pHash Hamming 4, cosine 0.93). Edit pairs: each original with each of its
edits, less edits whose pixels were clipped to white (``BLANK_CLIPPED``: one brightened
near-white photo). An edit pair is found when pHash Hamming <= max_hamming OR the
similarity >= threshold. The recommended threshold is the value of the grid (0.60..0.95,
step 0.01) with no distinct pair merged, plain or flip-aware, and the best recall (the
lowest such value); its margins are the highest distinct similarity (below it) and the
lowest edit similarity it accepts among the pairs pHash misses.

    python bench/dedup_calibration.py                     # 2-3 min on 2 free cores (1,430 forwards)
    python bench/dedup_calibration.py --cache /tmp/c.npz  # keeps corpus and embeddings: re-analysis in seconds
    python bench/dedup_calibration.py --show 6            # the 6 closest distinct pairs as PNGs in /tmp

Ends with one JSON line: {"threshold", "max_distinct_cosine", "min_edit_cosine_by_edit"
(flip: flip-aware), "recall_at_threshold" (plain), "recall_at_threshold_flip",
"distinct_merged_at_threshold", "flip_embed_cost_ratio" (CPU time of the mirrors' forwards /
the plain ones), "n_photos", "n_distinct_pairs", "n_edit_pairs", ...}.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image, ImageEnhance, ImageOps  # noqa: E402

TARGET_EDITS = ("q30", "half", "crop85", "bright", "rot5", "flip", "caption")  # the list
EXTRA_EDITS = ("colour", "jpeg2", "border")
MODEL = "mobilenet_v2_imagenet"

def _default_max_hamming() -> int:
    from manifests.config import NearDedupConfig

    return int(NearDedupConfig().max_hamming)


MAX_HAMMING = _default_max_hamming()  # near_dedup.max_hamming's default (8)
GRID = np.round(np.arange(0.60, 0.9501, 0.01), 2)
# Distinct photos that no global detector can tell from an edit: scikit-image's stereo pair
# is one scene from two viewpoints 6% of the width apart (the right view is the left one
# shifted ~42 px of 640), pHash Hamming 4, cosine 0.93 -- closer than an 85% crop is to its
# original. Reported on their own, left out of the distinct pairs the threshold must keep apart.
SAME_SCENE = (("skimage/motorcycle_left", "skimage/motorcycle_right"),)
BLANK_CLIPPED = 0.95  # an edit with this share of its pixels at 255 has lost its content (not a copy)


def extra_edits(a: np.ndarray) -> dict[str, Image.Image]:
    """More aggregator edits: saturation 1.5, two JPEG generations (q75 then q50), a white
    border of 1/40 of the width."""
    from pipeline.testdata.images import encode

    im = Image.fromarray(np.asarray(a)[..., :3])
    gen1 = Image.open(io.BytesIO(encode(im, "JPEG", quality=75))).convert("RGB")
    return {
        "colour": ImageEnhance.Color(im).enhance(1.5),
        "jpeg2": Image.open(io.BytesIO(encode(gen1, "JPEG", quality=50))).convert("RGB"),
        "border": ImageOps.expand(im, border=max(4, im.size[0] // 40), fill=(255, 255, 255)),
    }


@dataclass
class Corpus:
    photo: np.ndarray  # (n,) index of the source photo of each item
    edit: np.ndarray  # (n,) "orig" or the edit's name
    names: list[str]  # photo names (index -> name)
    phash: np.ndarray  # (n,) uint64, the pipeline's pHash
    inputs: np.ndarray  # (n, 224, 224, 3) uint8 model inputs
    clipped: np.ndarray  # (n,) share of the decode's pixels at 255 in every channel


def build_corpus(edits: tuple[str, ...] = TARGET_EDITS + EXTRA_EDITS, bank: dict | None = None) -> Corpus:
    """Originals (JPEG q92) and their ``edits`` (JPEG q90), each through validate_image and
    model_input as the pipeline does."""
    from pipeline.testdata import images
    from manifests.config import ValidateConfig
    from stages.backbones import model_input
    from stages.validate import validate_image

    bank = bank if bank is not None else images.photo_bank()
    cfg = ValidateConfig()
    names = sorted(bank)
    photo, edit, hashes, inputs, clipped = [], [], [], [], []

    def add(i: int, e: str, data: bytes) -> None:
        info = validate_image(data, cfg, cover=224)
        if info.reason is not None:
            raise RuntimeError(f"{names[i]} {e}: rejected by validate ({info.reason}: {info.detail})")
        photo.append(i)
        edit.append(e)
        hashes.append(info.phash)
        inputs.append(model_input(info.decoded, 224))
        clipped.append(float(np.mean(info.decoded.min(axis=2) >= 255)))

    want_extra = [e for e in edits if e in EXTRA_EDITS]
    for i, n in enumerate(names):
        a = bank[n]
        add(i, "orig", images.encode(Image.fromarray(a), "JPEG", quality=92))
        ed = images.edited_copies(a)
        if want_extra:
            ed.update(extra_edits(a))
        for e in edits:
            add(i, e, images.encode(ed[e], "JPEG", quality=90))
    return Corpus(np.array(photo), np.array(edit), names, np.array(hashes, dtype=np.uint64), np.stack(inputs),
                  np.array(clipped))


def embed_both(inputs: np.ndarray, flip: bool = True, batch: int = 32, backbone=None) -> tuple:
    """Raw (uncentred) embeddings of the model inputs and, with ``flip``, of their horizontal
    mirrors (None without); and the cost of each: wall and CPU seconds (process time, all
    threads) of the forwards, a plain batch and its mirrored batch run one after the other
    so that both see the same load."""
    import torch

    from stages.backbones import load_backbone

    bb = backbone or load_backbone(MODEL)
    out, out_f = [], []
    cost = {"plain_wall_s": 0.0, "plain_cpu_s": 0.0, "flip_wall_s": 0.0, "flip_cpu_s": 0.0}

    def run(x, kind, sink):
        w, c = time.perf_counter(), time.process_time()
        sink.append(bb(torch.from_numpy(np.ascontiguousarray(x))).numpy())
        cost[f"{kind}_wall_s"] += time.perf_counter() - w
        cost[f"{kind}_cpu_s"] += time.process_time() - c

    with torch.inference_mode():
        for s in range(0, len(inputs), batch):
            x = inputs[s : s + batch]
            run(x, "plain", out)
            if flip:
                run(x[:, :, ::-1], "flip", out_f)
    return np.concatenate(out), (np.concatenate(out_f) if flip else None), cost


def hamming_matrix(h: np.ndarray) -> np.ndarray:
    """All-pairs Hamming distances of uint64 hashes (n x n)."""
    bits = np.unpackbits(h.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1).astype(np.int16)
    return bits.sum(1)[:, None] + bits.sum(1)[None, :] - 2 * (bits @ bits.T)


def similarities(e: np.ndarray, ef: np.ndarray | None, mean: np.ndarray | None,
                 flip_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(plain cosine matrix, flip-aware cosine matrix or None) of centred, normalized rows.
    Flip-aware: max(cos(a, b), cos(a, flip(b)), cos(flip(a), b)), ``ef`` holding the mirrors
    of every row, or of the rows ``flip_rows`` only (then the terms with a mirror missing
    are left out)."""
    from stages.kernels.near_dedup import center_normalize

    z = center_normalize(e, mean)
    s = z @ z.T
    if ef is None:
        return s, None
    zf = center_normalize(ef, mean)
    if flip_rows is None:
        c = z @ zf.T  # c[i, j] = cos(i, flip(j)); cos(flip(i), j) = c[j, i]
    else:
        c = np.full_like(s, -1.0)
        c[:, flip_rows] = z @ zf.T
    return s, np.maximum(s, np.maximum(c, c.T))


def pair_sets(c: Corpus, edits: tuple[str, ...], same_scene=SAME_SCENE) -> dict:
    """Index pairs (i < j): 'distinct' (items of two photos, same-scene photos excepted),
    'distinct_orig' (two originals), 'same_scene' (items of two same-scene photos), and per
    edit name the (original, edit) pairs, blank edits (content clipped away) excepted and
    listed under 'blank'."""
    n = len(c.photo)
    i, j = np.triu_indices(n, 1)
    cross = c.photo[i] != c.photo[j]
    idx = {name: k for k, name in enumerate(c.names)}
    scene = np.zeros_like(cross)
    for a, b in same_scene:
        if a in idx and b in idx:
            pa_, pb_ = idx[a], idx[b]
            scene |= ((c.photo[i] == pa_) & (c.photo[j] == pb_)) | ((c.photo[i] == pb_) & (c.photo[j] == pa_))
    distinct = cross & ~scene
    orig = (c.edit[i] == "orig") & (c.edit[j] == "orig")
    out = {"distinct": (i[distinct], j[distinct]), "distinct_orig": (i[distinct & orig], j[distinct & orig]),
           "same_scene": (i[scene], j[scene]), "blank": []}
    orig_of = {p: k for k, (p, e) in enumerate(zip(c.photo, c.edit)) if e == "orig"}
    for e in edits:
        k = np.flatnonzero(c.edit == e)
        blank = c.clipped[k] >= BLANK_CLIPPED
        out["blank"] += [int(x) for x in k[blank]]
        k = k[~blank]
        out[e] = (np.array([orig_of[p] for p in c.photo[k]], dtype=np.int64), k)
    return out


def edit_arrays(sim: np.ndarray, ham: np.ndarray, pairs: dict, edits: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    return (np.concatenate([sim[pairs[e]] for e in edits]), np.concatenate([ham[pairs[e]] for e in edits]))


def sweep(sim: np.ndarray, ham: np.ndarray, pairs: dict, edits: tuple[str, ...], max_hamming: int = MAX_HAMMING,
          grid: np.ndarray = GRID, distinct: str = "distinct") -> dict:
    """Per threshold of ``grid``: distinct pairs merged by the semantic detector, and the
    recall of the ``edits`` pairs (pHash OR cosine)."""
    di, dj = pairs[distinct]
    ds = np.sort(sim[di, dj])
    es, eh = edit_arrays(sim, ham, pairs, edits)
    merged = len(ds) - np.searchsorted(ds, grid - 1e-9, side="left")
    recall = np.array([np.mean((eh <= max_hamming) | (es >= t - 1e-9)) for t in grid])
    return {"grid": grid, "merged": merged, "recall": recall}


def recommend(sims: dict, ham: np.ndarray, pairs: dict, edits: tuple[str, ...], max_hamming: int = MAX_HAMMING,
              distinct: str = "distinct", grid: np.ndarray = GRID) -> dict:
    """The threshold of ``grid`` with no distinct pair merged under every similarity of
    ``sims`` (plain and flip-aware) and the best recall (the sum of their recalls; recall
    falls as the threshold rises, so the lowest such value). Its margins: ``max_distinct``,
    the highest distinct similarity (below the threshold), and ``min_edit_accepted``, the
    lowest similarity of an edit pair that pHash misses and the threshold accepts."""
    di, dj = pairs[distinct]
    top = max(float(s[di, dj].max()) for s in sims.values())
    sw = [sweep(s, ham, pairs, edits, max_hamming, grid, distinct) for s in sims.values()]
    ok = np.all([w["merged"] == 0 for w in sw], axis=0)
    if not ok.any():
        return {"threshold": None, "max_distinct": top, "min_edit_accepted": None, "margin": None}
    score = np.where(ok, np.sum([w["recall"] for w in sw], axis=0), -1.0)
    t = float(grid[int(np.argmax(score))])
    accepted = []
    for s in sims.values():
        es, eh = edit_arrays(s, ham, pairs, edits)
        ok_e = (eh > max_hamming) & (es >= t)
        if ok_e.any():
            accepted.append(float(es[ok_e].min()))
    low = min(accepted) if accepted else None
    return {"threshold": t, "max_distinct": top, "min_edit_accepted": low,
            "margin": None if low is None else low - top}


def evaluate(t: float, sim: np.ndarray, ham: np.ndarray, pairs: dict, edits: tuple[str, ...],
             max_hamming: int = MAX_HAMMING, distinct: str = "distinct") -> dict:
    """At threshold ``t``: distinct pairs merged (semantic; perceptual), the recall of
    ``edits`` (pHash OR cosine) and the (original, edit) pairs missed."""
    di, dj = pairs[distinct]
    found = total = 0
    miss = []
    for e in edits:
        a, b = pairs[e]
        hit = (ham[a, b] <= max_hamming) | (sim[a, b] >= t)
        found += int(hit.sum())
        total += len(hit)
        miss += [(int(x), int(y), e) for x, y in zip(a[~hit], b[~hit])]
    return {"semantic_merged": int((sim[di, dj] >= t).sum()),
            "perceptual_merged": int((ham[di, dj] <= max_hamming).sum()),
            "recall": found / max(1, total), "missed": miss}


def compare_cost(z: np.ndarray, zf: np.ndarray, t: float, rows: int = 2000, repeat: int = 3) -> dict:
    """CPU seconds (process time) of the pipeline's exhaustive semantic compare
    (``kn.cosine_pairs``, bf16 screen + float32 check) on ``rows`` rows (the corpus repeated
    with a little noise): plain (the rows among themselves); flip with the mirrors as 2x rows
    (plus every row against every mirror: all of cos(a, flip(b)) and cos(flip(a), b)); flip
    4x (rows and mirrors all among themselves)."""
    from stages.kernels.near_dedup import cosine_pairs

    reps = -(-rows // len(z))
    rng = np.random.default_rng(0)
    x = np.tile(z, (reps, 1))[:rows] + rng.normal(0, 0.02, (rows, z.shape[1])).astype(np.float32)
    xf = np.tile(zf, (reps, 1))[:rows] + rng.normal(0, 0.02, (rows, z.shape[1])).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    xf /= np.linalg.norm(xf, axis=1, keepdims=True)
    k = np.arange(rows, dtype=np.uint64)
    kk = np.r_[k, k]

    def best(f):
        ts = []
        for _ in range(repeat):
            s = time.process_time()
            f()
            ts.append(time.process_time() - s)
        return min(ts)

    plain = best(lambda: cosine_pairs(x, k, None, None, t))
    two = best(lambda: (cosine_pairs(x, k, None, None, t), cosine_pairs(x, k, xf, k, t)))
    four = best(lambda: cosine_pairs(np.r_[x, xf], kk, None, None, t))
    return {"rows": rows, "plain_cpu_s": plain, "flip_2x_cpu_s": two, "flip_4x_cpu_s": four,
            "flip_2x_ratio": two / plain, "flip_4x_ratio": four / plain}


def side_by_side(c: Corpus, i: int, j: int, path: str) -> None:
    a, b = Image.fromarray(c.inputs[i]), Image.fromarray(c.inputs[j])
    out = Image.new("RGB", (a.width + b.width + 8, max(a.height, b.height)), (255, 255, 255))
    out.paste(a, (0, 0))
    out.paste(b, (a.width + 8, 0))
    out.save(path)


def label(c: Corpus, i: int) -> str:
    return c.names[c.photo[i]] + ("" if c.edit[i] == "orig" else f"[{c.edit[i]}]")


def load_or_embed(edits: tuple[str, ...], cache: str | None) -> tuple:
    """(corpus, embeddings, mirrored embeddings, cost); from ``cache`` (an .npz this function
    wrote) when it exists and holds the same edits."""
    if cache and Path(cache).exists():
        d = np.load(cache, allow_pickle=False)
        if tuple(d["edits"].tolist()) == edits:
            c = Corpus(d["photo"], d["edit"], d["names"].tolist(), d["phash"], d["inputs"], d["clipped"])
            cost = dict(zip(d["cost_keys"].tolist(), d["cost_vals"].tolist()))
            print(f"corpus and embeddings from {cache}", flush=True)
            return c, d["e"], d["ef"], cost
    import torch

    from stages.backbones import load_backbone

    t0 = time.perf_counter()
    c = build_corpus(edits)
    cost = {"build_s": time.perf_counter() - t0}
    print(f"corpus: {len(c.names)} photos, {len(c.photo)} items ({', '.join(edits)}), built in {cost['build_s']:.1f} s",
          flush=True)
    bb = load_backbone(MODEL)
    bb(torch.from_numpy(c.inputs[:8]))  # warm-up
    e, ef, ec = embed_both(c.inputs, backbone=bb)
    cost.update(ec)
    if cache:
        np.savez(cache, edits=np.array(edits), photo=c.photo, edit=c.edit, names=np.array(c.names), phash=c.phash,
                 inputs=c.inputs, clipped=c.clipped, e=e, ef=ef, cost_keys=np.array(list(cost)),
                 cost_vals=np.array(list(cost.values())))
    return c, e, ef, cost


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mean", choices=("corpus", "originals", "none"), default="corpus",
                    help="the centring mean: over the whole corpus (default), the originals only, or none")
    ap.add_argument("--max-hamming", type=int, default=MAX_HAMMING)
    ap.add_argument("--no-extra", action="store_true", help="the issue's edits only")
    ap.add_argument("--show", type=int, default=0, help="write the N closest distinct pairs to /tmp as PNGs")
    ap.add_argument("--cache", default=None, help="an .npz for the corpus and its embeddings (re-analysis)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    edits = TARGET_EDITS if args.no_extra else TARGET_EDITS + EXTRA_EDITS
    mh = args.max_hamming
    c, e, ef, cost = load_or_embed(edits, args.cache)
    n = len(c.photo)
    if "plain_wall_s" in cost:
        print(f"embedded: {n} inputs, {cost['plain_cpu_s']:.1f} CPU s ({cost['plain_wall_s']:.1f} s wall); "
              f"their mirrors {cost['flip_cpu_s']:.1f} CPU s ({cost['flip_wall_s']:.1f} s wall)", flush=True)
    ham = hamming_matrix(c.phash)
    pairs = pair_sets(c, edits)
    orig = c.edit == "orig"
    means = {"corpus": e.mean(0), "originals": e[orig].mean(0), "none": None}
    s, sf = similarities(e, ef, means[args.mean])
    sims = {"plain": s, "flip": sf}
    di, dj = pairs["distinct"]
    oi, oj = pairs["distinct_orig"]
    si, sj = pairs["same_scene"]

    # (1) distinct pairs
    print(f"\n(1) distinct pairs: {len(di)} across photos (originals and edits), {len(oi)} original vs original; "
          f"centring mean: {args.mean}")
    for kind, m in sims.items():
        v, vo = m[di, dj], m[oi, oj]
        print(f"  {kind:5s}: max {v.max():.3f}, 99.9th pct {np.percentile(v, 99.9):.3f}, 99th {np.percentile(v, 99):.3f}; "
              f"originals: max {vo.max():.3f}, 99.9th {np.percentile(vo, 99.9):.3f}")
    order = np.argsort(-sf[di, dj], kind="stable")
    top10, seen = [], set()
    print("  closest distinct photos (their closest items; flip-aware cosine, plain cosine, pHash Hamming):")
    for k in order:
        a, b = int(di[k]), int(dj[k])
        key = (c.photo[a], c.photo[b])
        if key in seen:
            continue
        seen.add(key)
        top10.append({"a": label(c, a), "b": label(c, b), "cosine_flip": round(float(sf[a, b]), 4),
                      "cosine": round(float(s[a, b]), 4), "hamming": int(ham[a, b])})
        print(f"    {label(c, a):34s} {label(c, b):40s} {sf[a, b]:.3f} {s[a, b]:.3f} {ham[a, b]:3d}")
        if len(top10) == 10:
            break
    top_orig = []
    for k in np.argsort(-sf[oi, oj], kind="stable")[:10]:
        a, b = int(oi[k]), int(oj[k])
        top_orig.append({"a": c.names[c.photo[a]], "b": c.names[c.photo[b]], "cosine": round(float(s[a, b]), 4),
                         "cosine_flip": round(float(sf[a, b]), 4), "hamming": int(ham[a, b])})
    print("  closest original pairs (plain, flip-aware):\n    " + "\n    ".join(
        f"{p['a']} ~ {p['b']}: {p['cosine']:.3f}, {p['cosine_flip']:.3f}" for p in top_orig))
    print(f"  pHash: min Hamming across photos {ham[di, dj].min()} (originals {ham[oi, oj].min()}); "
          f"pairs <= {mh}: {(ham[di, dj] <= mh).sum()}")
    same_scene = {}
    if len(si):
        so = (c.edit[si] == "orig") & (c.edit[sj] == "orig")
        same_scene = {"pairs": [list(p) for p in SAME_SCENE], "cosine_originals": round(float(s[si[so], sj[so]].max()), 4),
                      "cosine_max": round(float(sf[si, sj].max()), 4), "cosine_min": round(float(s[si, sj].min()), 4),
                      "hamming_originals": int(ham[si[so], sj[so]].min()),
                      "hamming_le_max": round(float(np.mean(ham[si, sj] <= mh)), 3)}
        print(f"  same-scene pairs left out ({', '.join('~'.join(p) for p in SAME_SCENE)}): originals cosine "
              f"{same_scene['cosine_originals']:.3f}, Hamming {same_scene['hamming_originals']}; over their items cosine "
              f"{same_scene['cosine_min']:.3f}..{same_scene['cosine_max']:.3f}, pHash <= {mh} for "
              f"{same_scene['hamming_le_max']:.0%}: merged by pHash alone, whatever the threshold")
    if pairs["blank"]:
        print(f"  blank edits left out (>= {BLANK_CLIPPED:.0%} of pixels clipped to white): "
              + ", ".join(label(c, k) for k in pairs["blank"]))

    # (2) edit pairs
    print("\n(2) edit pairs, original vs edit: plain cosine | flip-aware cosine | pHash Hamming")
    per_edit = {}
    for ed in edits:
        a, b = pairs[ed]
        v, vf, h = s[a, b], sf[a, b], ham[a, b]
        per_edit[ed] = {"min": float(v.min()), "p5": float(np.percentile(v, 5)), "min_flip": float(vf.min()),
                        "p5_flip": float(np.percentile(vf, 5)), "hamming_median": float(np.median(h)),
                        "hamming_max": int(h.max()), "phash_caught": float(np.mean(h <= mh))}
        print(f"  {ed:8s} cos min {v.min():.3f} p5 {np.percentile(v, 5):.3f} | flip-aware min {vf.min():.3f} "
              f"p5 {np.percentile(vf, 5):.3f} | Hamming median {np.median(h):.0f} max {h.max():2d}, "
              f"pHash <= {mh}: {np.mean(h <= mh):.0%}")

    # (3) grid
    print("\n(3) grid: distinct pairs merged (plain / flip-aware; originals only, flip-aware), recall on the "
          "target edits (plain / flip-aware), on all edits (plain / flip-aware)")
    sw = {k: sweep(m, ham, pairs, TARGET_EDITS, mh) for k, m in sims.items()}
    swo = sweep(sf, ham, pairs, TARGET_EDITS, mh, distinct="distinct_orig")
    sw_all = {k: sweep(m, ham, pairs, edits, mh) for k, m in sims.items()}
    for g, t in enumerate(GRID):
        print(f"  {t:.2f}: merged {sw['plain']['merged'][g]:4d} / {sw['flip']['merged'][g]:4d}; {swo['merged'][g]:3d}   "
              f"recall {sw['plain']['recall'][g]:.4f} / {sw['flip']['recall'][g]:.4f}   "
              f"all edits {sw_all['plain']['recall'][g]:.4f} / {sw_all['flip']['recall'][g]:.4f}")

    # (4) recommendation
    rec = recommend(sims, ham, pairs, TARGET_EDITS, mh)
    rec_o = recommend(sims, ham, pairs, TARGET_EDITS, mh, distinct="distinct_orig")
    t = rec["threshold"]
    at = {k: evaluate(t, m, ham, pairs, TARGET_EDITS, mh) for k, m in sims.items()}
    at_all = {k: evaluate(t, m, ham, pairs, edits, mh) for k, m in sims.items()}
    at_o = {k: evaluate(rec_o["threshold"], m, ham, pairs, TARGET_EDITS, mh) for k, m in sims.items()}
    print(f"\n(4) recommended threshold {t}: highest distinct similarity {rec['max_distinct']:.4f} (plain and "
          f"flip-aware) below it, lowest edit similarity it accepts (of the pairs pHash misses) "
          f"{rec['min_edit_accepted']:.4f}; gap {rec['margin']:.4f}")
    for k in sims:
        print(f"  {k}: distinct pairs merged {at[k]['semantic_merged']} by cosine (+ {at[k]['perceptual_merged']} by "
              f"pHash); recall {at[k]['recall']:.4f} on the target edits, {at_all[k]['recall']:.4f} on all")
    print("  missed at the threshold (flip-aware similarity):")
    for a, b, ed in at_all["flip"]["missed"]:
        print(f"    {label(c, b):42s} cos {s[a, b]:.3f} flip-aware {sf[a, b]:.3f} Hamming {ham[a, b]}")
    print(f"  with distinct = originals only: {rec_o['threshold']} (highest {rec_o['max_distinct']:.4f}, lowest accepted "
          f"{rec_o['min_edit_accepted']:.4f}, gap {rec_o['margin']:.4f}); recall {at_o['plain']['recall']:.4f} / "
          f"{at_o['flip']['recall']:.4f}, distinct items merged {at_o['flip']['semantic_merged']}")
    by_detector = {}
    for ed in edits:
        a, b = pairs[ed]
        ph = ham[a, b] <= mh
        se = (sf if ed == "flip" else s)[a, b] >= t
        by_detector[ed] = {"phash": round(float(ph.mean()), 3), "semantic": round(float(se.mean()), 3),
                           "semantic_only": round(float((se & ~ph).mean()), 3), "either": round(float((se | ph).mean()), 3)}
    print(f"  caught at {t} by pHash / cosine / cosine only / either (flip: flip-aware):")
    for ed, d in by_detector.items():
        print(f"    {ed:8s} {d['phash']:.2f} / {d['semantic']:.2f} / {d['semantic_only']:.2f} / {d['either']:.2f}")
    sens = {}
    print(f"  centring mean: highest distinct, recommended, lowest accepted edit; at {t}: distinct merged, recall plain / flip")
    for mk, mv in means.items():
        s2, sf2 = similarities(e, ef, mv)
        r2 = recommend({"plain": s2, "flip": sf2}, ham, pairs, TARGET_EDITS, mh)
        ev, evf = (evaluate(t, m, ham, pairs, TARGET_EDITS, mh) for m in (s2, sf2))
        sens[mk] = {"max_distinct": round(r2["max_distinct"], 4), "threshold": r2["threshold"],
                    "min_edit_accepted": r2["min_edit_accepted"] and round(r2["min_edit_accepted"], 4), "merged_at_t": max(ev["semantic_merged"], evf["semantic_merged"]),
                    "recall_at_t": round(ev["recall"], 4), "recall_at_t_flip": round(evf["recall"], 4)}
        print(f"    {mk:9s}: {r2['max_distinct']:.3f}, {r2['threshold']}, {sens[mk]['min_edit_accepted']}; "
              f"{sens[mk]['merged_at_t']}, {ev['recall']:.4f} / {evf['recall']:.4f}")
    from stages.near_dedup import DEFAULT_THRESHOLDS

    cur = DEFAULT_THRESHOLDS.get(MODEL)
    if cur is not None:
        ec, ecf = (evaluate(cur, m, ham, pairs, TARGET_EDITS, mh) for m in (s, sf))
        print(f"  DEFAULT_THRESHOLDS[{MODEL!r}] = {cur}: distinct pairs merged {ec['semantic_merged']} "
              f"(flip-aware {ecf['semantic_merged']}), recall {ec['recall']:.4f} / {ecf['recall']:.4f}")

    # (5) flip cost
    from stages.kernels.near_dedup import center_normalize

    cc = compare_cost(center_normalize(e, means[args.mean]), center_normalize(ef, means[args.mean]), t)
    embed_ratio = cost["flip_cpu_s"] / cost["plain_cpu_s"] if cost.get("plain_cpu_s") else float("nan")
    print(f"\n(5) flip cost: the mirrors' forwards {cost.get('flip_cpu_s', float('nan')):.1f} CPU s vs "
          f"{cost.get('plain_cpu_s', float('nan')):.1f} ({embed_ratio:.2f}x: the embedding stage's model work "
          f"{1 + embed_ratio:.2f}x; {1000 * cost.get('plain_cpu_s', float('nan')) / n:.0f} CPU ms/image); semantic "
          f"compare of {cc['rows']} rows: plain {cc['plain_cpu_s']:.2f} CPU s, mirrors as 2x rows "
          f"{cc['flip_2x_cpu_s']:.2f} ({cc['flip_2x_ratio']:.2f}x), 4x {cc['flip_4x_cpu_s']:.2f} ({cc['flip_4x_ratio']:.2f}x)")
    if args.show:
        for k, p in enumerate(order[: args.show]):
            path = f"/tmp/dedup_calib_pair{k}.png"
            side_by_side(c, int(di[p]), int(dj[p]), path)
            print(f"  wrote {path}: {label(c, int(di[p]))} vs {label(c, int(dj[p]))}")

    result = {
        "threshold": t,
        "max_distinct_cosine": round(rec["max_distinct"], 4),
        "max_distinct_cosine_originals": round(max(float(s[oi, oj].max()), float(sf[oi, oj].max())), 4),
        "min_edit_accepted": round(rec["min_edit_accepted"], 4),
        "margin": round(rec["margin"], 4),
        "min_edit_cosine_by_edit": {k: round(v["min_flip"] if k == "flip" else v["min"], 4) for k, v in per_edit.items()},
        "min_flip_edit_cosine_plain": round(per_edit["flip"]["min"], 4),
        "recall_at_threshold": round(at["plain"]["recall"], 4),
        "recall_at_threshold_flip": round(at["flip"]["recall"], 4),
        "recall_all_edits_flip": round(at_all["flip"]["recall"], 4),
        "distinct_merged_at_threshold": max(at["plain"]["semantic_merged"], at["flip"]["semantic_merged"]),
        "perceptual_distinct_merged": at["plain"]["perceptual_merged"],
        "missed_at_threshold_flip": [label(c, b) for _, b, _ in at["flip"]["missed"]],
        "caught_by": by_detector,
        "threshold_distinct_originals_only": rec_o["threshold"],
        "recall_flip_distinct_originals_only": round(at_o["flip"]["recall"], 4),
        "top_distinct": top10[:5],
        "same_scene": same_scene,
        "blank_edits": [label(c, k) for k in pairs["blank"]],
        "mean_sensitivity": sens,
        "flip_embed_cost_ratio": round(embed_ratio, 3),
        "flip_compare_cost_ratio_2x": round(cc["flip_2x_ratio"], 2),
        "flip_compare_cost_ratio_4x": round(cc["flip_4x_ratio"], 2),
        "cpu_ms_per_image": round(1000 * cost.get("plain_cpu_s", float("nan")) / n, 1),
        "n_photos": len(c.names),
        "n_items": n,
        "n_distinct_pairs": int(len(di)),
        "n_distinct_original_pairs": int(len(oi)),
        "n_edit_pairs": int(sum(len(pairs[ed][0]) for ed in TARGET_EDITS)),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
