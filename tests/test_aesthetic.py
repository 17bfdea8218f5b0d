"""LAION aesthetic heads loaded offline: the package's linear head (its layer, from a local
file read with weights_only, never a download) and the improved MLP, both equal to the
reference computation on the same embeddings."""

import numpy as np
import pytest
import torch

from stages.aesthetic import (LINEAR_FILE, AestheticError, ImprovedAestheticMLP, load_head, package_cache_path,
                              score)


@pytest.fixture
def offline_home(tmp_path, monkeypatch):
    """A fresh $HOME, and the package's downloader made to fail loudly if ever called."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    import aesthetic_predictor.libs as libs

    def no_download(*a, **k):
        raise AssertionError("aesthetic-predictor tried to download")

    monkeypatch.setattr(libs, "urlretrieve", no_download)
    return tmp_path


def _embeddings(n=5, seed=0):
    return np.random.default_rng(seed).normal(size=(n, 768)).astype(np.float32)


def test_linear_head_is_the_packages_layer_from_a_local_file(offline_home):
    import shutil

    torch.manual_seed(1)
    lin = torch.nn.Linear(768, 1)
    path = offline_home / LINEAR_FILE
    torch.save(lin.state_dict(), path)
    head = load_head("linear", str(path))
    assert not package_cache_path().exists()  # read where it is: nothing copied, nothing downloaded
    e = _embeddings()
    w, b = lin.weight.detach().numpy()[0], float(lin.bias.detach()[0])
    reference = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ w + b  # predict_aesthetic's last step
    assert np.allclose(score(head, e), reference, atol=1e-5)
    # the package's own model from the same file scores the same; without aesthetic.weights,
    # the file is read where the package keeps it
    package_cache_path().parent.mkdir(parents=True)
    shutil.copyfile(path, package_cache_path())
    from aesthetic_predictor import get_aesthetic_model

    get_aesthetic_model.cache_clear()
    assert np.allclose(score(get_aesthetic_model("large"), e), reference, atol=1e-5)
    assert np.allclose(score(load_head("linear", None), e), reference, atol=1e-5)


def test_improved_mlp_matches_the_reference_layout(tmp_path):
    torch.manual_seed(2)
    ref = ImprovedAestheticMLP()
    state = ref.state_dict()
    assert sorted(state) == sorted(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))
    path = tmp_path / "mlp.pth"
    torch.save(state, path)
    head = load_head("mlp", str(path))
    e = _embeddings(7, seed=3)
    x = e / np.linalg.norm(e, axis=1, keepdims=True)
    for i in (0, 2, 4, 6, 7):  # the reference MLP is linear layers only (dropout off at inference)
        x = x @ state[f"layers.{i}.weight"].numpy().T + state[f"layers.{i}.bias"].numpy()
    assert np.allclose(score(head, e), x[:, 0], atol=1e-4)


def test_missing_weights_and_wrong_dimension_are_clear(offline_home):
    with pytest.raises(AestheticError, match=LINEAR_FILE):
        load_head("linear", None)
    with pytest.raises(AestheticError, match="not found"):
        load_head("linear", str(offline_home / "nope.pth"))
    with pytest.raises(AestheticError, match="improved-aesthetic-predictor"):
        load_head("mlp", None)
    with pytest.raises(AestheticError, match="768-d"):
        score(ImprovedAestheticMLP().eval(), np.zeros((2, 512), np.float32))


@pytest.mark.slow
def test_pipeline_aesthetic_score_and_threshold(tmp_path, ray_local, photos):
    """Through the pipeline: a 768-d CLIP-like model (a random-weight Birder ViT with a
    768-d head, standing in for the real CLIP L/14) feeds the MLP head; the scores equal the
    head applied to the run's embedding table, and rows below min_score are rejected."""
    from birder.model_registry import registry

    from manifests.io import read_committed_table
    from pipeline import plan
    from pipeline.testdata import images
    from manifests.config import ConfigError, load_config
    from pipeline.embedding import aesthetic_active, model_plans
    from PIL import Image
    from stages.backbones import resolve_spec, save_birder_checkpoint
    from tests.test_pipeline import check_invariant

    s = resolve_spec("clip_like", network="vit_t16", size=64, dim=768, output="head")
    torch.manual_seed(0)
    net = registry.net_factory("vit_t16", 768, size=(64, 64))
    # Birder zero-initializes the classifier head: every "CLIP projection" would be 0 and
    # every score equal (the threshold then cut only float noise). Random weights instead.
    torch.nn.init.normal_(net.classifier.weight, std=0.05)
    save_birder_checkpoint(net, tmp_path / "clip_like.pt", s)
    torch.manual_seed(3)
    torch.save(ImprovedAestheticMLP().state_dict(), tmp_path / "mlp.pth")
    src = tmp_path / "in"
    src.mkdir()
    names = ["astronaut", "coffee", "chelsea", "rocket", "china", "flower"]
    for n in names:
        (src / f"{n}.jpg").write_bytes(images.encode(Image.fromarray(photos[n]).convert("RGB"), "JPEG"))
    model = {"name": "clip_like", "network": "vit_t16", "size": 64, "dim": 768, "output": "head",
             "weights": str(tmp_path / "clip_like.pt")}
    base = {"input.path": str(src), "embed.models": [model], "aesthetic.head": "mlp",
            "aesthetic.weights": str(tmp_path / "mlp.pth")}
    out = tmp_path / "run"
    summary = plan.run(load_config(None, {**base, "output": str(out), "aesthetic.min_score": None}))
    assert summary["aesthetic"]["scored"]
    # the only model has no semantic dedup threshold: near-duplicates by pHash only, said so
    assert "'clip_like'" in summary["near_dedup"]["semantic_skipped"] and "semantic" not in summary["near_dedup"]
    curated, _ = check_invariant(out, [str(src / f"{n}.jpg") for n in names])
    table = {r["id"]: np.asarray(r["embedding"], np.float32)
             for r in read_committed_table(f"{out}/stages/embed.clip_like").to_pylist()}
    assert len({v.tobytes() for v in table.values()}) == len(names)  # six photos, six embeddings
    head = load_head("mlp", str(tmp_path / "mlp.pth"))
    got = {r["id"]: r["aesthetic"] for r in curated.values()}
    ids = sorted(got)
    assert np.allclose([got[i] for i in ids], score(head, np.stack([table[i] for i in ids])), atol=1e-5)
    cut = float(np.median(list(got.values())))
    out2 = tmp_path / "run2"
    summary = plan.run(load_config(None, {**base, "output": str(out2), "aesthetic.min_score": cut}))
    curated2, rejected2 = check_invariant(out2, [str(src / f"{n}.jpg") for n in names])
    # The embeddings are recomputed (new output, new cache) in other batches: float16 CPU
    # results may differ in the last bits, so the rejects follow the run's own scores.
    scores2 = {r["id"]: r["aesthetic"] for r in [*curated2.values(), *rejected2.values()]}
    assert all(abs(scores2[i] - got[i]) < 1e-2 for i in ids)
    assert {r["id"] for r in rejected2.values()} == {i for i in ids if scores2[i] < cut}
    assert 0 < len(rejected2) < len(ids)
    assert all(r["reason"] == "low_aesthetic" and f"< min_score {cut:g}" in r["detail"] for r in rejected2.values())
    # a model that is not 768-d, or weights that are not there: one-line errors
    wrong = load_config(None, {**base, "output": "o", "embed.models": [{"name": "mobilenet_v2_imagenet"}]})
    with pytest.raises(ConfigError, match="768-d CLIP L/14 projections; model mobilenet_v2_imagenet gives 1280-d"):
        aesthetic_active(wrong, model_plans(wrong))
    gone = load_config(None, {**base, "output": "o", "aesthetic.weights": str(tmp_path / "none.pth")})
    with pytest.raises(ConfigError, match="none.pth not found"):
        aesthetic_active(gone, model_plans(gone))
    skip = load_config(None, {**base, "output": "o", "aesthetic.weights": str(tmp_path / "none.pth"),
                              "aesthetic.on_missing_weights": "skip"})
    assert aesthetic_active(skip, model_plans(skip)) is False
