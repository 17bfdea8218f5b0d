"""LAION aesthetic heads loaded offline: the package's linear head through its own loader
(from a placed local file, never a download) and the improved MLP, both equal to the
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


def test_linear_head_is_the_packages_own_from_a_local_file(offline_home):
    torch.manual_seed(1)
    lin = torch.nn.Linear(768, 1)
    path = offline_home / LINEAR_FILE
    torch.save(lin.state_dict(), path)
    head = load_head("linear", str(path))
    assert package_cache_path().read_bytes() == path.read_bytes()  # placed where the package looks
    e = _embeddings()
    w, b = lin.weight.detach().numpy()[0], float(lin.bias.detach()[0])
    reference = (e / np.linalg.norm(e, axis=1, keepdims=True)) @ w + b  # predict_aesthetic's last step
    assert np.allclose(score(head, e), reference, atol=1e-5)
    # the same package model object the reference code path uses
    from aesthetic_predictor import get_aesthetic_model

    assert get_aesthetic_model("large") is head


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
