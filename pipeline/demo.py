"""The offline demo: build a small corpus from photos shipped in installed packages plus
hostile files, then run the real pipeline on it (local Ray).

    python pipeline/demo.py [--workdir demo_out]

The corpus is a manifest (``corpus/manifest.csv``: uri + taxonomy-like metadata) over
images re-encoded in several formats, sizes and crops, with exact duplicates, a
placeholder served many times, broken and hostile files, and a row whose file is gone.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    # the checkout instead of this script's folder: pipeline/stages must not shadow stages/
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

from pipeline.testdata import images  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {  # what the sample photos show, as a catalog would say it
    "astronaut": ("Animalia", "Chordata", "Mammalia", "Primates", "Hominidae", "Homo", "Homo sapiens"),
    "chelsea": ("Animalia", "Chordata", "Mammalia", "Carnivora", "Felidae", "Felis", "Felis catus"),
    "coffee": ("Plantae", "Tracheophyta", "Magnoliopsida", "Gentianales", "Rubiaceae", "Coffea", "Coffea arabica"),
    "flower": ("Plantae", "Tracheophyta", "Magnoliopsida", None, None, None, None),
    "china": (None,) * 7,
    "rocket": (None,) * 7,
    "camera": ("Animalia", "Chordata", "Mammalia", "Primates", "Hominidae", "Homo", "Homo sapiens"),
    "immunohistochemistry": (None,) * 7,
}
RANKS = ("kingdom", "phylum", "class", "order", "family", "genus", "species")


def build_corpus(root: Path) -> Path:
    """Write images and ``manifest.csv`` under ``root``; returns the manifest path."""
    rng = np.random.default_rng(0)
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []

    def add(rel: str, data: bytes, photo: str | None, source: str) -> None:
        (img_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (img_dir / rel).write_bytes(data)
        labels = LABELS.get(photo, (None,) * 7)
        rows.append({"uri": str(img_dir / rel), **dict(zip(RANKS, labels)), "source": source,
                     "license": ["cc0", "cc-by", "cc-by-nc"][len(rows) % 3]})

    photos = images.photos()
    for name, arr in photos.items():
        img = Image.fromarray(arr)
        w, h = img.size
        add(f"{name}/original.jpg", images.encode(img, "JPEG", quality=92), name, "eol")
        add(f"{name}/original_copy.jpg", images.encode(img, "JPEG", quality=92), name, "gbif")  # exact dup
        add(f"{name}/lossless.png", images.encode(img, "PNG"), name, "inat")
        add(f"{name}/web.webp", images.encode(img.resize((w * 3 // 4, h * 3 // 4)), "WEBP", quality=80), name, "inat")
        for k in range(3):
            x0, y0 = int(rng.integers(0, w // 5)), int(rng.integers(0, h // 5))
            crop = img.crop((x0, y0, x0 + w * 3 // 4, y0 + h * 3 // 4))
            if k == 1:
                crop = ImageOps.mirror(crop)
            add(f"{name}/crop{k}.jpg", images.encode(crop, "JPEG", quality=int(rng.integers(70, 95))), name, "bioscan")
        big = img.resize((w * 3, h * 3), Image.Resampling.LANCZOS)
        add(f"{name}/large.jpg", images.encode(big, "JPEG", quality=88), name, "eol")
        add(f"{name}/rotated.jpg", images.with_exif_orientation(img.transpose(Image.Transpose.ROTATE_90), 6), name,
            "inat")
    for name, data in images.good_images(photos).items():
        add(f"formats/{name}", data, None, "misc")
    placeholder = images.encode(Image.new("RGB", (320, 240), (200, 200, 200)), "PNG")
    for k in range(25):
        add(f"unavailable/{k:02d}.png", placeholder, None, "gbif")
    for name, (data, _reason) in images.hostile_images(photos).items():
        add(f"hostile/{name}", data, None, "misc")
    wrong_name, wrong = images.wrong_extension()
    add(f"formats/{wrong_name}", wrong, "rocket", "misc")
    rows.append({"uri": str(img_dir / "gone" / "deleted.jpg"), **dict(zip(RANKS, LABELS["chelsea"])),
                 "source": "eol", "license": "cc-by"})

    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "demo_out"), help="Where the corpus and the run go.")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    t0 = time.time()
    manifest = build_corpus(work / "corpus")
    print(f"demo: corpus of {sum(1 for _ in manifest.open()) - 1} inputs in {manifest.parent} "
          f"({time.time() - t0:.1f} s)")
    from pipeline.run import main as run_main

    rc = run_main(["--config", str(ROOT / "configs" / "demo.yaml"),
                   "--input", str(manifest), "--output", str(work / "run")])
    if rc == 0:
        print(f"demo: {time.time() - t0:.1f} s in all")
    return rc


if __name__ == "__main__":
    sys.exit(main())
