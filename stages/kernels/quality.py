"""Technical image quality from the decoded image, no model: blur, exposure, contrast,
information content, letterbox borders. Pure numpy/OpenCV, on a fixed-size grayscale
thumbnail so the numbers compare across image sizes.

Every metric is a plain float per image:

* ``blur`` -- variance of the 3x3 Laplacian of the 256x256 grayscale thumbnail (0-255
  scale); sharp photos are in the hundreds to thousands, a Gaussian blur of radius 4 takes a
  photo below ~50;
* ``dark_clip`` / ``bright_clip`` -- fractions of thumbnail pixels at <= 4 / >= 251
  (crushed shadows, blown highlights);
* ``contrast`` -- RMS contrast, the standard deviation of gray levels / 255;
* ``entropy`` -- Shannon entropy of the 256-bin gray histogram, 0-8 bits: a near-uniform
  image has almost none;
* ``border`` -- the fraction of the image taken by flat bars at its edges (letterbox /
  pillarbox / scanner margins): rows or columns from an edge whose gray-level spread is
  below ``flat_std``.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

THUMB = 256
METRICS = ("blur", "dark_clip", "bright_clip", "contrast", "entropy", "border")


@dataclass(frozen=True)
class Quality:
    blur: float
    dark_clip: float
    bright_clip: float
    contrast: float
    entropy: float
    border: float


def gray_thumbnail(rgb: np.ndarray, side: int = THUMB) -> np.ndarray:
    """HxWx3 uint8 -> side x side uint8 gray (area-averaged; a squash, not a crop)."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) if rgb.ndim == 3 else rgb
    interp = cv2.INTER_AREA if min(gray.shape[:2]) >= side else cv2.INTER_LINEAR
    return cv2.resize(gray, (side, side), interpolation=interp)


def _flat_run(lines_std: np.ndarray, flat_std: float) -> int:
    """How many leading lines are flat."""
    not_flat = np.flatnonzero(lines_std >= flat_std)
    return int(not_flat[0]) if len(not_flat) else len(lines_std)


def border_fraction(gray: np.ndarray, flat_std: float = 2.0) -> float:
    """Fraction of the area covered by flat bars along the four edges."""
    g = gray.astype(np.float32)
    rows, cols = g.std(axis=1), g.std(axis=0)
    h, w = g.shape
    top, bottom = _flat_run(rows, flat_std), _flat_run(rows[::-1], flat_std)
    left, right = _flat_run(cols, flat_std), _flat_run(cols[::-1], flat_std)
    if top + bottom >= h or left + right >= w:  # flat everywhere: that is 'uniform', not letterbox
        return 1.0
    inner = (h - top - bottom) * (w - left - right)
    return float(1.0 - inner / (h * w))


def measure(rgb: np.ndarray) -> Quality:
    """Every metric of one decoded RGB (or gray) image."""
    gray = gray_thumbnail(rgb)
    lap = cv2.Laplacian(gray.astype(np.float32), cv2.CV_32F, ksize=1)
    hist = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / gray.size
    return Quality(
        blur=float(lap.var()),
        dark_clip=float(hist[:5].sum() / gray.size),
        bright_clip=float(hist[251:].sum() / gray.size),
        contrast=float(gray.std() / 255.0),
        entropy=float(max(0.0, -(p * np.log2(p)).sum())),
        border=border_fraction(gray),
    )
