"""Technical quality metrics on real photos (no Ray): blur, exposure, contrast,
near-uniform images, letterbox borders."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageFilter

from stages.kernels.quality import border_fraction, gray_thumbnail, measure

NAMES = ["astronaut", "coffee", "chelsea", "rocket", "camera", "china", "flower"]


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_blur_radius_4_scores_lower(photos, name):
    img = Image.fromarray(photos[name]).convert("RGB")
    sharp = measure(np.asarray(img))
    blurred = measure(np.asarray(img.filter(ImageFilter.GaussianBlur(4))))
    assert blurred.blur < sharp.blur / 10, (sharp.blur, blurred.blur)
    assert sharp.blur > 100 and blurred.blur < 50


def test_uniform_and_noisy_uniform_images_have_no_information():
    flat = measure(np.full((300, 400, 3), 128, np.uint8))
    assert flat.entropy == 0.0 and flat.contrast == 0.0 and flat.blur == 0.0 and flat.border == 1.0
    rng = np.random.default_rng(0)
    near = np.clip(128 + rng.normal(0, 0.6, (300, 400, 3)), 0, 255).astype(np.uint8)  # sensor noise only
    q = measure(near)
    assert q.entropy < 1.5 and q.contrast < 0.01


def test_photos_have_information_and_no_border(photos):
    for name in NAMES:
        q = measure(photos[name] if photos[name].ndim == 3 else np.stack([photos[name]] * 3, -1))
        assert q.entropy > 5 and q.contrast > 0.05 and q.border < 0.05, (name, q)


def test_exposure_clipping(photos):
    img = Image.fromarray(photos["chelsea"]).convert("RGB")
    over = measure(np.asarray(ImageEnhance.Brightness(img).enhance(3.0)))
    under = measure(np.asarray(ImageEnhance.Brightness(img).enhance(0.04)))
    normal = measure(np.asarray(img))
    assert over.bright_clip > 0.3 > normal.bright_clip
    assert under.dark_clip > 0.3 > normal.dark_clip


def test_letterbox_bars_are_measured(photos):
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[60:420] = np.asarray(Image.fromarray(photos["chelsea"]).convert("RGB").resize((640, 360)))
    assert measure(frame).border == pytest.approx(0.25, abs=0.02)
    pillar = np.full((400, 600, 3), 255, np.uint8)
    pillar[:, 100:500] = np.asarray(Image.fromarray(photos["rocket"]).convert("RGB").resize((400, 400)))
    assert border_fraction(gray_thumbnail(pillar)) == pytest.approx(200 / 600, abs=0.02)
