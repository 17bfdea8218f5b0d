"""The MobileNetV2 default semantic threshold on real photos (``bench/dedup_calibration.py``
measures it and explains the numbers): the 65 photos of ``samples.photo_bank()`` and their
edits (JPEG q30, 50% resize, centre crop 85%, brightness, rotation 5 degrees, mirror,
caption), through the pipeline's own decode, pHash and model input; cosine of centred
(mean of this corpus), normalized embeddings; mirrors embedded for the originals (the
flip-aware similarity of ``near_dedup.flip``: max(cos(a, b), cos(flip(a), b)))."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import dedup_calibration as dc  # noqa: E402

# At the recommended 0.77 the bench measures recall 0.976 on these pairs (0.980 when every
# pair counts at its flip-aware similarity, mirrors of every image embedded), no distinct
# pair merged; the 0.98 is met only below 0.764, where two edited copies of two
# distinct photos of one staged kitchen merge. The floor leaves room for a pair or two
# moving with the torch build.
RECALL_FLOOR = 0.97


@pytest.fixture(scope="module")
def measured():
    from stages.backbones import load_backbone

    c = dc.build_corpus(dc.TARGET_EDITS)
    bb = load_backbone(dc.MODEL)
    e, _, _ = dc.embed_both(c.inputs, flip=False, backbone=bb)
    orig = np.flatnonzero(c.edit == "orig")
    ef, _, _ = dc.embed_both(np.ascontiguousarray(c.inputs[orig][:, :, ::-1]), flip=False, backbone=bb)
    s, sf = dc.similarities(e, ef, e.mean(0), flip_rows=orig)
    return c, dc.hamming_matrix(c.phash), dc.pair_sets(c, dc.TARGET_EDITS), s, sf


@pytest.mark.slow  # 585 MobileNetV2 forwards on the CPU: about 1-2 min on 2 cores
def test_default_threshold_merges_no_distinct_photos(measured):
    from stages.near_dedup import DEFAULT_THRESHOLDS

    t = DEFAULT_THRESHOLDS[dc.MODEL]
    c, ham, pairs, s, sf = measured
    di, dj = pairs["distinct"]
    assert len(c.names) >= 60 and len(di) > 100_000
    for kind, m in (("plain", s), ("flip-aware", sf)):
        bad = np.flatnonzero(m[di, dj] >= t)
        assert not len(bad), (kind, t, [(dc.label(c, di[k]), dc.label(c, dj[k]), round(float(m[di[k], dj[k]]), 3))
                                        for k in bad[:10]])
    close = ham[di, dj] <= dc.MAX_HAMMING
    assert not close.any(), [(dc.label(c, a), dc.label(c, b)) for a, b in zip(di[close][:10], dj[close][:10])]
    # the stereo pair (one scene, viewpoints 6% of the width apart) is left out: pHash alone merges it
    si, sj = pairs["same_scene"]
    assert len(si) and (ham[si, sj] <= dc.MAX_HAMMING).any()


@pytest.mark.slow
def test_default_threshold_finds_edited_copies(measured):
    from stages.near_dedup import DEFAULT_THRESHOLDS

    t = DEFAULT_THRESHOLDS[dc.MODEL]
    c, ham, pairs, s, sf = measured
    found, total, missed = 0, 0, []
    for edit in dc.TARGET_EDITS:
        a, b = pairs[edit]
        sim = (sf if edit == "flip" else s)[a, b]
        hit = (ham[a, b] <= dc.MAX_HAMMING) | (sim >= t)
        found, total = found + int(hit.sum()), total + len(hit)
        missed += [(dc.label(c, y), round(float(v), 3)) for y, v in zip(b[~hit], sim[~hit])]
        if edit == "flip":
            assert hit.all() and sim.min() >= 0.95, sim.min()  # the mirror's own embedding finds every mirrored copy
    assert total >= 450
    assert found / total >= RECALL_FLOOR, (t, found / total, missed)
