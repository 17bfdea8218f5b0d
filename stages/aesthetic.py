"""LAION aesthetic heads on the 768-d OpenAI CLIP ViT-L/14 image projection
(``vit_l14_pn_quick_gelu_openai-clip``), loaded offline.

Two heads, both scoring the **L2-normalized** embedding on LAION's 0-10 scale:

* ``linear`` -- the ``aesthetic-predictor`` package's head (``get_aesthetic_model``): a
  ``Linear(768, 1)`` it loads from ``~/.cache/aesthetic_predictor/sa_0_4_vit_l_14_linear.pth``
  and downloads only when that file is absent. We never let it download: the configured
  local file is placed at that path first (same bytes), then the package's own loader runs.
* ``mlp`` -- the improved predictor the reference uses (``sac+logos+ava1-l14-linearMSE.pth``):
  768 -> 1024 -> 128 -> 64 -> 16 -> 1, with the reference's module layout
  (``layers.0/2/4/6/7``; dropout between layers is inactive at inference).

A missing file is an :class:`AestheticError` naming it and how to obtain it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def _place(weights: Path, target: Path) -> None:
    """Put ``weights`` at ``target`` (atomically) unless the same bytes are already there."""
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == digest:
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(weights, tmp)
    os.replace(tmp, target)


def load_head(kind: Literal["linear", "mlp"], weights: str | None) -> nn.Module:
    """The aesthetic head, in eval mode, from a local file (never a download)."""
    if kind == "linear":
        target = package_cache_path()
        if weights:
            if not Path(weights).is_file():
                raise AestheticError(f"aesthetic weights {weights} not found; get {LINEAR_FILE} from "
                                     "github.com/LAION-AI/aesthetic-predictor on a machine with network")
            _place(Path(weights), target)
        elif not target.is_file():
            raise AestheticError(f"aesthetic weights not found: set aesthetic.weights to a local {LINEAR_FILE} "
                                 f"(from github.com/LAION-AI/aesthetic-predictor) or place it at {target}")
        from aesthetic_predictor import get_aesthetic_model

        get_aesthetic_model.cache_clear()  # the package caches one model per process
        return get_aesthetic_model("large")
    if not weights or not Path(weights).is_file():
        raise AestheticError(f"aesthetic weights {weights or '(aesthetic.weights not set)'} not found; get {MLP_FILE} "
                             "from github.com/christophschuhmann/improved-aesthetic-predictor on a machine with network")
    head = ImprovedAestheticMLP()
    head.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return head.eval()


@torch.inference_mode()
def score(head: nn.Module, embeddings: np.ndarray) -> np.ndarray:
    """Aesthetic scores (float32, ~0-10) of CLIP L/14 projections (n, 768), normalized here."""
    x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
    if x.ndim != 2 or x.shape[1] != DIM:
        raise AestheticError(f"aesthetic head takes {DIM}-d CLIP L/14 projections, got shape {tuple(x.shape)}")
    x = nn.functional.normalize(x, dim=-1)
    return head(x).squeeze(-1).float().numpy()
