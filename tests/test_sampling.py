"""Diversity sampling: kernels without Ray (k-means levels, assignment, water-filling,
taxonomy quotas, picks), then the stage on real Ray."""

from __future__ import annotations

import numpy as np
import pytest

from stages.kernels import sampling as ks


def _classes(n: int, dim: int, classes: int, seed: int, zipf: float = 1.3, spread: float = 0.35):
    """Gaussian classes on the sphere with Zipf sizes (every class has at least one row)."""
    rng = np.random.default_rng(seed)
    cent = rng.standard_normal((classes, dim)).astype(np.float32)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True)
    weights = 1.0 / np.arange(1, classes + 1) ** zipf
    label = np.concatenate([np.arange(classes), rng.choice(classes, n - classes, p=weights / weights.sum())])
    x = cent[label] + spread * rng.standard_normal((n, dim)).astype(np.float32) / np.sqrt(dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True), label


def test_water_fill_known_inputs():
    assert ks.water_fill([1, 5, 10, 100], 30).tolist() == [1, 5, 10, 14]
    assert ks.water_fill([1, 5, 10, 100], 31).tolist() == [1, 5, 10, 15]
    assert ks.water_fill([10, 10, 10], 20).tolist() == [7, 7, 6]  # remainder in index order
    assert ks.water_fill([10, 10, 10], 20, tie=np.array([2, 1, 0])).tolist() == [6, 7, 7]
    assert ks.water_fill([3, 4], 100).tolist() == [3, 4]  # more asked than there is
    assert ks.water_fill([100, 100, 100], 90, floors=[50, 0, 0]).tolist() == [50, 20, 20]
    assert ks.water_fill([100, 100, 100], 30, floors=[50, 40, 0]).tolist() == [15, 15, 0]  # floors cut evenly
    assert ks.water_fill([0, 0], 5).tolist() == [0, 0]


def test_water_fill_properties_on_random_inputs():
    rng = np.random.default_rng(0)
    for _ in range(300):
        k = int(rng.integers(1, 40))
        sizes = rng.integers(0, 200, k)
        floors = np.minimum(sizes, rng.integers(0, 20, k)) * (rng.random(k) < 0.3)
        total = int(rng.integers(0, sizes.sum() + 50))
        a = ks.water_fill(sizes, total, floors)
        assert a.sum() == min(total, sizes.sum())
        assert np.all(a >= 0) and np.all(a <= sizes)
        if total >= floors.sum():
            assert np.all(a >= floors)
            # max-min fair: a cluster left short of its size is within one of every unfloored allocation
            short = (a < sizes) & (a > floors)
            if short.any():
                assert a[short].min() >= a[floors == 0].max() - 1 if (floors == 0).any() else True


def test_hierarchical_allocation_sums_to_target_and_respects_sizes():
    rng = np.random.default_rng(1)
    leaf_sizes = rng.zipf(1.5, 200).clip(max=5000)
    up1 = rng.integers(0, 20, 200)
    up2 = rng.integers(0, 4, 20)
    floors = np.minimum(leaf_sizes, rng.integers(0, 3, 200))
    for total in (0, 1, 57, 1000, int(leaf_sizes.sum()) - 1, int(leaf_sizes.sum()) + 10):
        a = ks.allocate(leaf_sizes, [up1, up2], total, floors)
        assert a.sum() == min(total, leaf_sizes.sum())
        assert np.all(a <= leaf_sizes)
        if total >= floors.sum():
            assert np.all(a >= floors)
    # balance at the top: 4 top clusters share equally unless one is too small
    a = ks.allocate(leaf_sizes, [up1, up2], 400)
    top = np.bincount(up2[up1], weights=a, minlength=4)
    top_size = np.bincount(up2[up1], weights=leaf_sizes, minlength=4)
    assert all(t == 100 or t == s for t, s in zip(top, top_size))


def test_kmeans_levels_recover_planted_clusters_and_assignment_is_batch_independent():
    x, label = _classes(6000, 64, 12, seed=2, zipf=0.0, spread=0.5)
    fitted = ks.fit_levels(x, [12, 3], iters=20, seed=0, method="resampled", resample_points=[20, 3],
                           resample_steps=3, n_init=3)
    leaf, sim = ks.assign(x, fitted[0]["centroids"])
    # every found cluster is (almost) one planted class, and every class is found
    purity = sum(np.bincount(label[leaf == c]).max() for c in np.unique(leaf)) / len(x)
    assert purity > 0.99 and len(np.unique(leaf)) == 12
    assert fitted[1]["centroids"].shape == (3, 64) and fitted[0]["up"].shape == (12,)
    assert ks.row_levels(leaf, fitted).shape == (len(x), 2)
    # the same rows in other batches and orders get the same clusters and similarities
    perm = np.random.default_rng(0).permutation(len(x))
    leaf2, sim2 = ks.assign(x[perm], fitted[0]["centroids"], chunk=333)
    assert np.array_equal(leaf2, leaf[perm]) and np.array_equal(sim2, sim[perm])
    # deterministic for a seed
    again = ks.fit_levels(x, [12, 3], iters=20, seed=0, method="resampled", resample_points=[20, 3],
                          resample_steps=3, n_init=3)
    assert np.array_equal(again[0]["centroids"], fitted[0]["centroids"])


def test_taxon_quota_caps_and_minimums_spread_over_clusters():
    rng = np.random.default_rng(3)
    taxon = np.r_[np.zeros(100, int), np.ones(5, int), np.full(20, 2), np.full(7, -1)]
    leaf = np.r_[np.repeat([0, 1, 2, 3], 25), rng.integers(0, 4, 5), np.zeros(20, int), np.zeros(7, int)]
    rank = rng.permutation(len(taxon)).astype(np.uint64)
    eligible, reserved = ks.taxon_quota(taxon, leaf, rank, cap=8, minimum=3)
    assert eligible[taxon == 0].sum() == 8 and eligible[taxon == 2].sum() == 8
    assert eligible[taxon == 1].all() and eligible[taxon == -1].all()  # under the cap / unknown
    assert np.bincount(leaf[(taxon == 0) & eligible], minlength=4).tolist() == [2, 2, 2, 2]  # round robin
    assert reserved[taxon == 0].sum() == 3 and reserved[taxon == 1].sum() == 3 and not reserved[taxon == -1].any()
    # within a (taxon, leaf), the lowest ranks first
    sel = (taxon == 0) & (leaf == 0)
    assert set(rank[sel & eligible]) == set(np.sort(rank[sel])[:2])


def test_pick_takes_allocation_reserved_first():
    leaf = np.array([0, 0, 0, 0, 1, 1, 1])
    key = np.array([5, 1, 3, 2, 9, 8, 7], np.uint64)
    eligible = np.array([True, True, False, True, True, True, True])
    reserved = np.array([True, False, False, False, False, False, False])
    chosen = ks.pick(leaf, key, eligible, reserved, np.array([2, 3]))
    assert chosen.tolist() == [True, True, False, False, True, True, True]


def _sample_indices(x, taxa, n_target, levels, seed=0, cap=None, minimum=None):
    fitted = ks.fit_levels(x, levels, iters=15, seed=seed, method="resampled", resample_points=[10, 5, 3],
                           resample_steps=3)
    leaf, _ = ks.assign(x, fitted[0]["centroids"])
    rank = np.random.default_rng(seed).permutation(len(x)).astype(np.uint64)
    if cap or minimum:
        eligible, reserved = ks.taxon_quota(taxa, leaf, rank, cap, minimum)
    else:
        eligible, reserved = np.ones(len(x), bool), np.zeros(len(x), bool)
    k = len(fitted[0]["centroids"])
    alloc = ks.allocate(np.bincount(leaf[eligible], minlength=k), [lv["up"] for lv in fitted[:-1]], n_target,
                        np.bincount(leaf[reserved], minlength=k))
    return np.flatnonzero(ks.pick(leaf, rank, eligible, reserved, alloc))


def test_balanced_sample_has_higher_label_entropy_than_random_and_caps_hold():
    """Zipf-sized Gaussian classes: the balanced sample's normalized label entropy is
    clearly above a random sample's at the same size; a per-class cap holds."""
    x, label = _classes(20_000, 48, 100, seed=4, zipf=1.3)
    n_target = 2000
    chosen = _sample_indices(x, label, n_target, [400, 40, 8])
    random = np.random.default_rng(5).choice(len(x), n_target, replace=False)
    h_bal, h_rand = ks.label_entropy(label[chosen], 100), ks.label_entropy(label[random], 100)
    h_all = ks.label_entropy(label, 100)
    print(f"\nnormalized label entropy: corpus {h_all:.3f}, random {h_rand:.3f}, balanced {h_bal:.3f}; classes "
          f"present: random {len(np.unique(label[random]))}, balanced {len(np.unique(label[chosen]))}")
    assert len(chosen) == n_target
    assert h_bal > h_rand + 0.05
    assert len(np.unique(label[chosen])) > len(np.unique(label[random]))
    capped = _sample_indices(x, label, n_target, [400, 40, 8], cap=30, minimum=5)
    counts = np.bincount(label[capped], minlength=100)
    sizes = np.bincount(label, minlength=100)
    assert counts.max() <= 30 and len(capped) == n_target
    assert np.all(counts >= np.minimum(sizes, 5))


def test_label_entropy():
    assert ks.label_entropy(np.array([1, 1, 2, 2])) == pytest.approx(1.0)
    assert ks.label_entropy(np.array([1, 1, 1])) == 0.0
    assert 0 < ks.label_entropy(np.array([1, 1, 1, 2])) < 1
    assert ks.label_entropy(np.array([1, 1, 2, 2]), classes=4) == pytest.approx(0.5)


def _crops(photo: np.ndarray, count: int, seed: int) -> list:
    """Distinct views of one real photo: random crops (40-70% of each side), resized."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    a = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
    h, w = a.shape[:2]
    out = []
    for _ in range(count):
        ch, cw = int(h * rng.uniform(0.4, 0.7)), int(w * rng.uniform(0.4, 0.7))
        y, x = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        out.append(Image.fromarray(np.ascontiguousarray(a[y : y + ch, x : x + cw])).resize((160, 128)))
    return out


def test_pipeline_balanced_sample_of_long_tailed_real_photos(tmp_path, ray_local, photos):
    """A manifest of real photo views whose 'species' (the source photo) has Zipf-like
    counts: the sample of 24 rows covers the species more evenly than random sampling,
    caps and minimums per species hold, every other row is a not_sampled reject, and the
    invariant holds."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from pipeline import plan
    from manifests.config import load_config
    from pipeline.testdata.images import encode
    from tests.test_pipeline import check_invariant

    counts = {"astronaut": 30, "coffee": 16, "chelsea": 9, "rocket": 6, "camera": 4, "coins": 2, "moon": 1}
    import skimage.data as sd

    source = {**photos, "coins": sd.coins(), "moon": sd.moon()}
    (tmp_path / "img").mkdir()
    uris, species = [], []
    for i, (name, c) in enumerate(counts.items()):
        for j, im in enumerate(_crops(source[name], c, seed=i)):
            p = tmp_path / "img" / f"{name}_{j:02d}.jpg"
            p.write_bytes(encode(im, "JPEG", quality=90))
            uris.append(str(p))
            species.append(name)
    pacsv.write_csv(pa.table({"uri": uris, "species": species}), tmp_path / "manifest.csv")
    overrides = {"input.path": str(tmp_path / "manifest.csv"), "embed.models": [{"name": "mobilenet_v2_imagenet"}],
                 "quality.min_entropy": None, "near_dedup.enabled": False,
                 "sample.target": 24, "sample.levels": [12, 4], "sample.max_per_taxon": 6, "sample.min_per_taxon": 1,
                 "sample.resample_steps": 3, "embed.cache_path": str(tmp_path / "cache")}
    cfg = load_config(None, {**overrides, "output": str(tmp_path / "run")})
    summary = plan.run(cfg)
    curated, rejected = check_invariant(tmp_path / "run", uris)
    rep = summary["sample"]
    print("\nsample:", rep)
    assert len(curated) == 24 and rep["selected"] == 24 and rep["levels"] == [12, 4]
    got = [r["species"] for r in curated.values()]
    per = {s: got.count(s) for s in counts}
    assert max(per.values()) <= 6 and all(per[s] >= 1 for s in counts), per
    for r in curated.values():
        assert r["sampled"] is True and 0 <= r["cluster_l1"] < 12 and 0 <= r["cluster_l2"] < 4
    not_sampled = [r for r in rejected.values() if r["reason"] == "not_sampled"]
    assert len(not_sampled) == len(uris) - 24
    assert all(r["stage"] == "sample" and "leaf cluster" in r["detail"] and r["cluster_l1"] is not None
               for r in not_sampled)
    assert sum("over its taxon's cap" in r["detail"] for r in not_sampled) == 30 - 6 + 16 - 6 + 9 - 6
    # more even than random sampling at the same size (averaged over 200 random draws)
    rng = np.random.default_rng(0)
    labels = np.array(species)
    h_random = np.mean([ks.label_entropy(labels[rng.choice(len(labels), 24, replace=False)], len(counts))
                        for _ in range(200)])
    h_sample = ks.label_entropy(np.array(got), len(counts))
    print(f"normalized species entropy: sample {h_sample:.3f}, random {h_random:.3f}")
    assert h_sample > h_random + 0.1
    # (the same rows whatever the blocks and concurrency: tests/test_refresh.py, every stage)
