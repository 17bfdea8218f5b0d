"""validate on real encoded images: every format/mode accepted, every hostile file
rejected with its reason, EXIF and modes normalized, time limit per image."""

import io
import time

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageFile

from manifests.schema import BYTES, Reason
from pipeline.testdata import images
from manifests.config import ValidateConfig
from stages.deadline import DeadlineExceeded, deadline
from manifests.rejects import reject_rows
from stages.validate import validate_batch, validate_image

CFG = ValidateConfig()


def _wh(rgb: np.ndarray) -> tuple[int, int]:
    return rgb.shape[1], rgb.shape[0]


def test_every_good_format_and_mode_is_accepted_as_rgb(good):
    for name, data in good.items():
        info = validate_image(data, CFG)
        assert info.reason is None, (name, info.detail)
        assert info.image.dtype == np.uint8 and info.image.shape[2] == 3, name
        assert min(info.image.shape[:2]) == min(256, info.width, info.height), name
        assert info.sha256 and len(info.sha256) == 64 and info.phash is not None


def test_formats_and_modes_are_sniffed_from_content(good):
    expect = {"astronaut.jpg": ("JPEG", "RGB"), "coffee.png": ("PNG", "RGB"), "chelsea.webp": ("WEBP", "RGB"),
              "rocket.tiff": ("TIFF", "RGB"), "china.bmp": ("BMP", "RGB"), "flower_cmyk.jpg": ("JPEG", "CMYK"),
              "camera_l.png": ("PNG", "L"), "coffee_rgba.png": ("PNG", "RGBA"), "chelsea_p.png": ("PNG", "P"),
              "animated.gif": ("GIF", "P")}
    for name, (fmt, mode) in expect.items():
        info = validate_image(good[name], CFG)
        assert (info.format, info.mode) == (fmt, mode), name
    info = validate_image(good["astronaut_i16.png"], CFG)
    assert info.mode.startswith("I")
    name, data = images.wrong_extension()
    assert validate_image(data, CFG).format == "PNG"


@pytest.mark.parametrize("name", ["truncated.jpg", "truncated.png", "zero.jpg", "random.jpg", "text_as.png",
                                  "one_pixel.png", "bomb.png", "banner.jpg"])
def test_hostile_files_are_rejected_with_reason(hostile, name):
    data, reason = hostile[name]
    info = validate_image(data, CFG)
    assert info.reason == Reason(reason), (name, info.reason, info.detail)
    assert info.detail


def test_truncation_is_detected_with_draft_decoding(photos):
    big = Image.fromarray(photos["china"]).resize((2400, 1600), Image.Resampling.LANCZOS)
    data = images.encode(big, "JPEG", quality=90)
    ok = validate_image(data, CFG)
    assert ok.reason is None and ok.image.shape[0] == 256 and (ok.width, ok.height) == (2400, 1600)
    for frac in (0.3, 0.6, 0.9):
        assert validate_image(data[: int(len(data) * frac)], CFG).reason == Reason.CORRUPT


def test_exif_orientation_is_applied(photos):
    src = Image.fromarray(photos["astronaut"]).resize((400, 200))
    info = validate_image(images.with_exif_orientation(src, 6), CFG)
    assert info.reason is None and info.exif_orientation == 6
    assert (info.width, info.height) == (200, 400)  # displayed size
    expected = np.asarray(src.transpose(Image.Transpose.ROTATE_270).resize(_wh(info.image)), dtype=float)
    assert np.abs(np.asarray(info.image, dtype=float) - expected).mean() < 12


def test_modes_are_normalized_sensibly(good):
    rgba = validate_image(good["coffee_rgba.png"], CFG).image  # alpha 200/255 over white: brighter
    plain = validate_image(good["coffee.png"], CFG).image
    assert np.asarray(rgba, float).mean() > np.asarray(plain, float).mean() + 10
    i16 = np.asarray(validate_image(good["astronaut_i16.png"], CFG).image, float)
    assert 40 < i16.mean() < 200 and i16.std() > 20  # scaled from 16 bit, not clipped white
    cmyk = np.asarray(validate_image(good["flower_cmyk.jpg"], CFG).image, float)
    assert cmyk.std() > 20


def test_first_frame_of_animation(good, photos):
    info = validate_image(good["animated.gif"], CFG)
    assert info.n_frames == 2
    first = np.asarray(Image.fromarray(photos["rocket"]).resize((300, 200)).resize(_wh(info.image)), float)
    second = np.asarray(Image.fromarray(photos["coffee"]).resize((300, 200)).resize(_wh(info.image)), float)
    got = np.asarray(info.image, float)
    assert np.abs(got - first).mean() < np.abs(got - second).mean()


def test_thresholds_come_from_config(good):
    data = good["coffee.png"]
    assert validate_image(data, ValidateConfig(max_bytes=1000)).reason == Reason.FILE_TOO_LARGE
    assert validate_image(data, ValidateConfig(allowed_formats=["JPEG"])).reason == Reason.FORMAT_NOT_ALLOWED
    assert validate_image(data, ValidateConfig(min_side=500)).reason == Reason.TOO_SMALL
    assert validate_image(data, ValidateConfig(max_pixels=1000)).reason == Reason.DECOMPRESSION_BOMB
    assert validate_image(data, ValidateConfig(max_aspect=1.2)).reason == Reason.BAD_ASPECT


class _ExplodingImageFile(ImageFile.ImageFile):
    format = "EXPLODE"

    def _open(self):
        self._size = (300, 300)
        self._mode = "RGB"
        self.tile = []

    def load(self):
        raise RuntimeError("decoder bug")


def test_any_decoder_exception_becomes_a_reject():
    Image.register_open("EXPLODE", _ExplodingImageFile, lambda prefix: prefix[:7] == b"EXPLODE")
    try:
        info = validate_image(b"EXPLODE" + b"\0" * 100, ValidateConfig(allowed_formats=["EXPLODE"]))
    finally:
        Image.OPEN.pop("EXPLODE", None)
        Image.ID.remove("EXPLODE")
    assert info.reason == Reason.CORRUPT and "RuntimeError" in info.detail


def test_deadline_interrupts_python_and_is_cleared():
    with pytest.raises(DeadlineExceeded):
        with deadline(0.1):
            while True:
                pass
    with deadline(0.5):
        x = sum(range(1000))
    time.sleep(0.7)  # a finished block must not fire later
    assert x == 499500


def _slow_png() -> bytes:
    # 48 MP of smooth gradient: small file, ~1 s of decode, under the default pixel cap.
    y, x = np.mgrid[0:6000, 0:8000]
    arr = np.stack([(x // 32) % 256, (y // 24) % 256, ((x + y) // 56) % 256], axis=-1).astype(np.uint8)
    return images.encode(Image.fromarray(arr), "PNG", compress_level=1)


def test_slow_file_is_rejected_in_time_and_the_batch_completes(good):
    slow = _slow_png()
    warm = pa.table({"id": ["w"], "uri": ["w"], BYTES: pa.array([good["rocket.tiff"]], pa.binary())})
    validate_batch(reject_rows(warm, "ingest", [None]), CFG)  # imports done, decode process started (TIFF goes there)
    t0 = time.perf_counter()
    unlimited = validate_image(slow, ValidateConfig(timeout_s=0, max_bytes=10**9))
    full = time.perf_counter() - t0
    assert unlimited.reason is None and full > 0.1
    cfg = ValidateConfig(timeout_s=full / 5, max_bytes=10**9)  # relative: robust to machine speed
    blobs = [good["astronaut.jpg"], slow, good["coffee.png"]]
    table = reject_rows(pa.table({"id": ["a", "b", "c"], "uri": ["a", "b", "c"],
                                  BYTES: pa.array(blobs, pa.binary())}), "ingest", [None] * 3)
    t0 = time.perf_counter()
    out = validate_batch(table, cfg)
    took = time.perf_counter() - t0
    assert out.column("reason").to_pylist() == [None, "decode_timeout", None]
    assert took < full * 0.7, (took, full)
    assert BYTES not in out.column_names


def test_batch_passes_upstream_rejects_through(good):
    table = reject_rows(pa.table({"id": ["a", "b"], "uri": ["a", "b"],
                                  BYTES: pa.array([good["astronaut.jpg"], None], pa.binary())}),
                        "ingest", [None, (Reason.MISSING, "gone")])
    out = validate_batch(table, CFG).to_pylist()
    assert out[0]["reason"] is None and out[0]["format"] == "JPEG" and out[0]["n_bytes"] > 0
    assert (out[1]["stage"], out[1]["reason"], out[1]["detail"]) == ("ingest", "missing", "gone")


def test_fast_jpeg_path_matches_a_full_decode(photos):
    from stages.validate import decode_jpeg_scaled

    src = Image.fromarray(photos["china"]).resize((1600, 1068), Image.Resampling.LANCZOS)
    data = images.encode(src, "JPEG", quality=92)
    img = Image.open(io.BytesIO(data))
    assert decode_jpeg_scaled(data, img, 256) is not None  # libjpeg-turbo DCT-scaled path taken
    info = validate_image(data, CFG)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize(_wh(info.image), Image.Resampling.BILINEAR),
                     float)
    got = info.image.astype(float)
    cos = (got * ref).sum() / np.sqrt((got * got).sum() * (ref * ref).sum())
    assert cos > 0.999 and np.abs(got - ref).mean() < 4


def test_harmless_libjpeg_warning_falls_back_to_pillow_and_passes(photos):
    from stages.validate import decode_jpeg_scaled

    data = images.encode(Image.fromarray(photos["coffee"]), "JPEG", quality=90)
    at = data.index(b"\xff\xdb")  # first quantization table
    odd = data[:at] + b"\x00\x00" + data[at:]  # libjpeg: "2 extraneous bytes before marker 0xdb"
    assert decode_jpeg_scaled(odd, Image.open(io.BytesIO(odd)), 256) is None  # strict decoder refuses
    assert validate_image(odd, CFG).reason is None  # Pillow accepts it, as a viewer would
    cmyk = images.encode(Image.fromarray(photos["flower"]).convert("CMYK"), "JPEG")
    assert decode_jpeg_scaled(cmyk, Image.open(io.BytesIO(cmyk)), 256) is None  # CMYK: Pillow path
