"""LAION aesthetic heads on the 768-d OpenAI CLIP ViT-L/14 image projection
(``vit_l14_pn_quick_gelu_openai-clip``), loaded offline.

Two heads, both scoring the **L2-normalized** embedding on LAION's 0-10 scale:

* ``linear`` -- the ``aesthetic-predictor`` package's head (``get_aesthetic_model``): a
  ``Linear(768, 1)`` with the weights of ``sa_0_4_vit_l_14_linear.pth``, from the
  configured file or, without one, from where the package keeps it
  (``~/.cache/aesthetic_predictor/``). We build the layer ourselves: the package's loader
  downloads a missing file and calls ``torch.load`` without ``weights_only``, which runs
  any code a pickle carries wherever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set (or on
  torch < 2.6).
* ``mlp`` -- the improved predictor the reference uses (``sac+logos+ava1-l14-linearMSE.pth``):
  768 -> 1024 -> 128 -> 64 -> 16 -> 1, with the reference's module layout
  (``layers.0/2/4/6/7``; dropout between layers is inactive at inference).

Both are read with ``torch.load(..., weights_only=True)``: tensors only, never code. A
missing file, or one that is not a plain state dict, is an :class:`AestheticError` naming it
(and how to obtain it).
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

LINEAR_FILE = "sa_0_4_vit_l_14_linear.pth"
MLP_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DIM = 768


class AestheticError(ValueError):
    """A one-line, user-facing problem with the aesthetic head (missing weights)."""


class ImprovedAestheticMLP(nn.Module):
    """The LAION improved aesthetic predictor (christophschuhmann/improved-aesthetic-predictor)."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def package_cache_path() -> Path:
    """Where ``aesthetic_predictor.get_aesthetic_model('large')`` looks for its weights."""
    return Path.home() / ".cache" / "aesthetic_predictor" / LINEAR_FILE


def _state_dict(path: Path) -> dict:
    """The tensors stored in ``path``, never the code a pickle may carry (weights_only)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise AestheticError(f"aesthetic weights {path} are not a plain state dict of tensors; refused (loading it "
                             f"could run code): {first}") from None


def load_head(kind: Literal["linear", "mlp"], weights: str | None) -> nn.Module:
    """The aesthetic head, in eval mode, from a local file (never a download)."""
    if kind == "linear":
        path = Path(weights) if weights else package_cache_path()
        if weights and not path.is_file():
            raise AestheticError(f"aesthetic weights {weights} not found; get {LINEAR_FILE} from "
                                 "github.com/LAION-AI/aesthetic-predictor on a machine with network")
        if not path.is_file():
            raise AestheticError(f"aesthetic weights not found: set aesthetic.weights to a local {LINEAR_FILE} "
                                 f"(from github.com/LAION-AI/aesthetic-predictor) or place it at {path}")
        head: nn.Module = nn.Linear(DIM, 1)  # get_aesthetic_model("large")'s layer
    else:
        if not weights or not Path(weights).is_file():
            raise AestheticError(f"aesthetic weights {weights or '(aesthetic.weights not set)'} not found; get "
                                 f"{MLP_FILE} from github.com/christophschuhmann/improved-aesthetic-predictor on a "
                                 "machine with network")
        path, head = Path(weights), ImprovedAestheticMLP()
    head.load_state_dict(_state_dict(path))
    return head.eval()


@torch.inference_mode()
def score(head: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """Aesthetic scores (float32, ~0-10) of CLIP L/14 projections (n, 768), normalized here."""
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != DIM:
        raise AestheticError(f"aesthetic head takes {DIM}-d CLIP L/14 projections, got shape {tuple(x.shape)}")
    x = nn.functional.normalize(x, dim=-1)
    return head(x).squeeze(-1).float().numpy()
