"""Real encoded images for the demo and the tests: photos shipped by scikit-image and
scikit-learn, re-encoded with Pillow in many formats and modes, plus hostile files."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def photos() -> dict[str, np.ndarray]:
    """Real RGB photographs shipped inside installed packages (no network)."""
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out = {
        "astronaut": sd.astronaut(),
        "coffee": sd.coffee(),
        "chelsea": sd.chelsea(),
        "rocket": sd.rocket(),
        "camera": np.stack([sd.camera()] * 3, axis=-1),
        "immunohistochemistry": sd.immunohistochemistry(),
    }
    china, flower = load_sample_images().images
    out["china"], out["flower"] = china, flower
    return out


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def with_exif_orientation(img: Image.Image, orientation: int) -> bytes:
    """A JPEG whose stored pixels must be transposed by EXIF ``orientation`` to display."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(img, "JPEG", quality=90, exif=exif.tobytes())


def png_with_header_size(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR declares ``width x height`` (a decompression-bomb header)."""
    raw = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    raw[16:24] = struct.pack(">II", width, height)
    raw[29:33] = struct.pack(">I", zlib.crc32(bytes(raw[12:29])))
    return bytes(raw)


def animated_gif(frames: list[Image.Image]) -> bytes:
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def good_images(photo: dict[str, np.ndarray] | None = None) -> dict[str, bytes]:
    """Valid images: every format and mode validate must accept (name -> bytes)."""
    p = photo or photos()
    rgb = Image.fromarray(p["astronaut"])
    coffee = Image.fromarray(p["coffee"])
    chelsea = Image.fromarray(p["chelsea"])
    rocket = Image.fromarray(p["rocket"])
    gray16 = Image.fromarray((np.asarray(rgb.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    rgba = coffee.convert("RGBA")
    rgba.putalpha(200)
    out = {
        "astronaut.jpg": encode(rgb, "JPEG", quality=90),
        "coffee.png": encode(coffee, "PNG"),
        "chelsea.webp": encode(chelsea, "WEBP", quality=85),
        "rocket.tiff": encode(rocket, "TIFF"),
        "china.bmp": encode(Image.fromarray(p["china"]).resize((320, 214)), "BMP"),
        "flower_cmyk.jpg": encode(Image.fromarray(p["flower"]).convert("CMYK"), "JPEG", quality=90),
        "camera_l.png": encode(Image.fromarray(p["camera"]).convert("L"), "PNG"),
        "coffee_rgba.png": encode(rgba, "PNG"),
        "chelsea_p.png": encode(chelsea.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "astronaut_i16.png": encode(gray16, "PNG"),
        "animated.gif": animated_gif([rocket.resize((300, 200)), coffee.resize((300, 200))]),
        "rotated6.jpg": with_exif_orientation(Image.fromarray(p["immunohistochemistry"]).resize((400, 200)), 6),
    }
    return out


def hostile_images(photo: dict[str, np.ndarray] | None = None) -> dict[str, tuple[bytes, str]]:
    """Files validate must reject: name -> (bytes, expected reason)."""
    p = photo or photos()
    jpg = encode(Image.fromarray(p["coffee"]), "JPEG", quality=90)
    png = encode(Image.fromarray(p["chelsea"]), "PNG")
    return {
        "truncated.jpg": (jpg[: len(jpg) // 2], "corrupt"),
        "truncated.png": (png[: len(png) // 2], "corrupt"),
        "zero.jpg": (b"", "empty"),
        "random.jpg": (np.random.default_rng(7).bytes(5000), "unknown_format"),
        "text_as.png": (b"this is not an image at all\n" * 50, "unknown_format"),
        "one_pixel.png": (encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "too_small"),
        "bomb.png": (png_with_header_size(40000, 40000), "decompression_bomb"),
        "banner.jpg": (encode(Image.fromarray(p["rocket"]).resize((1400, 120)), "JPEG"), "bad_aspect"),
    }


def wrong_extension() -> tuple[str, bytes]:
    """A PNG saved under a .jpg name: accepted, sniffed as PNG."""
    return "actually_png.jpg", encode(Image.fromarray(photos()["rocket"]), "PNG")
