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


@pytest.mark.slow
def test_filter_stage_rejects_by_quality_with_scores_and_thresholds(tmp_path, ray_local, photos):
    from pipeline import plan
    from pipeline.testdata import images
    from manifests.config import load_config
    from tests.test_pipeline import check_invariant

    src = tmp_path / "in"
    src.mkdir()
    files = {}
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        files[f"{name}.jpg"] = images.encode(Image.fromarray(photos[name]).convert("RGB"), "JPEG", quality=92)
    rocket = Image.fromarray(photos["rocket"]).convert("RGB")
    files["rocket_blurred.jpg"] = images.encode(rocket.filter(ImageFilter.GaussianBlur(4)), "JPEG", quality=92)
    files["gray.png"] = images.encode(Image.new("RGB", (320, 240), (90, 90, 90)), "PNG")
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[80:400] = np.asarray(Image.fromarray(photos["chelsea"]).convert("RGB").resize((640, 320)))
    files["chelsea_letterbox.png"] = images.encode(Image.fromarray(frame), "PNG")
    chelsea = Image.fromarray(photos["chelsea"]).convert("RGB")
    files["chelsea_blown.jpg"] = images.encode(ImageEnhance.Brightness(chelsea).enhance(3.0), "JPEG", quality=92)
    for rel, data in files.items():
        (src / rel).write_bytes(data)
    out = tmp_path / "run"
    cfg = load_config(None, {"input.path": str(src), "output": str(out), "quality.min_blur": 50,
                             "quality.max_border": 0.2, "quality.max_bright_clip": 0.3})
    summary = plan.run(cfg)
    curated, rejected = check_invariant(out, [str(src / f) for f in files])
    by_name = {u.rsplit("/", 1)[1]: r for u, r in rejected.items()}
    assert {n: r["reason"] for n, r in by_name.items()} == {
        "rocket_blurred.jpg": "blurry", "gray.png": "uniform", "chelsea_letterbox.png": "letterbox",
        "chelsea_blown.jpg": "overexposed"}
    assert all(r["stage"] == "filter" for r in by_name.values())
    assert by_name["rocket_blurred.jpg"]["detail"].startswith("q_blur ") and "< min_blur 50" in by_name["rocket_blurred.jpg"]["detail"]
    assert summary["rejected_by_stage"] == {"filter": {"blurry": 1, "letterbox": 1, "overexposed": 1, "uniform": 1}}
    for r in curated.values():
        assert r["q_blur"] > 50 and r["q_entropy"] > 5 and r["q_border"] < 0.2
    assert by_name["rocket_blurred.jpg"]["q_blur"] < 50  # rejects keep their scores for the report
