"""Pure kernels on tiny hand-checked inputs (no Ray, no I/O)."""

import numpy as np
from PIL import Image

from stages.kernels.exact_dedup import resolve_exact_duplicates
from stages.kernels.hashing import seeded_rank, stable_id
from stages.kernels.phash import hamming64, phash64


def test_stable_id_is_a_pure_function_of_location():
    assert stable_id("s3://b/a.jpg") == stable_id("s3://b/a.jpg")
    assert stable_id("s3://b/a.jpg") != stable_id("s3://b/b.jpg")
    assert len(stable_id("x")) == 32


def test_seeded_rank_depends_on_seed_and_id_not_order():
    ids = [f"id{i}" for i in range(50)]
    r = dict(zip(ids, seeded_rank(3, ids)))
    rev = dict(zip(ids[::-1], seeded_rank(3, ids[::-1])))
    assert r == rev
    assert not np.array_equal(seeded_rank(3, ids), seeded_rank(4, ids))


def test_exact_duplicates_keep_lowest_rank_and_flag_placeholders():
    sha = np.array(["a", "b", "a", "c", "c", "c", "a"])
    rank = np.array([5, 1, 2, 9, 8, 7, 3], dtype=np.uint64)
    status, keeper = resolve_exact_duplicates(sha, rank, placeholder_min_copies=0)
    # "a": rows 0, 2, 6 -> keep row 2 (rank 2); "c": rows 3, 4, 5 -> keep row 5 (rank 7)
    assert status.tolist() == [1, 0, 0, 1, 1, 0, 1]
    assert keeper.tolist() == [2, -1, -1, 5, 5, -1, 2]
    status, keeper = resolve_exact_duplicates(sha, rank, placeholder_min_copies=3)
    assert status.tolist() == [2, 0, 2, 2, 2, 2, 2]  # both triples are placeholders
    assert keeper.tolist() == [-1] * 7


def test_exact_duplicates_independent_of_row_order():
    rng = np.random.default_rng(0)
    sha = rng.choice(list("abcdef"), size=40)
    ids = np.array([f"r{i}" for i in range(40)])
    rank = seeded_rank(1, ids)
    s1, k1 = resolve_exact_duplicates(sha, rank, 0)
    perm = rng.permutation(40)
    s2, k2 = resolve_exact_duplicates(sha[perm], rank[perm], 0)
    kept1 = {ids[i] for i in np.flatnonzero(s1 == 0)}
    kept2 = {ids[perm][i] for i in np.flatnonzero(s2 == 0)}
    assert kept1 == kept2 and len(kept1) == len(set(sha))


def _gray32(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("L").resize((32, 32), Image.Resampling.BILINEAR))


def test_phash_stable_under_resize_and_different_across_photos(photos):
    a = Image.fromarray(photos["astronaut"])
    h = phash64(_gray32(a))
    h_small = phash64(_gray32(a.resize((200, 200))))
    h_other = phash64(_gray32(Image.fromarray(photos["coffee"])))
    assert hamming64(np.array([h]), np.array([h_small]))[0] <= 4
    assert hamming64(np.array([h]), np.array([h_other]))[0] >= 16


def test_hamming64_hand_checked():
    a = np.array([0b1011, 0, 2**64 - 1], dtype=np.uint64)
    b = np.array([0b0001, 0, 0], dtype=np.uint64)
    assert hamming64(a, b).tolist() == [2, 0, 64]


def test_bloom_has_no_false_negatives_and_bounded_false_positives():
    from stages.kernels.bloom import bloom_add, bloom_contains, new_bloom

    keys = [f"uuid-{i}" for i in range(20000)]
    bits, k = new_bloom(10000, 0.01)
    bloom_add(bits, keys[:10000], k)
    assert bloom_contains(bits, keys[:10000], k).all()
    fp = bloom_contains(bits, keys[10000:], k).mean()
    assert 0.002 < fp < 0.02  # sized for 10k keys at 1%
    assert bloom_contains(bits, [], k).shape == (0,)
