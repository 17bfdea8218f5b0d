"""Rendered non-natural images for the non-natural filter's tests and measurements: maps,
drawings, screenshots, slides and documents (charts and plain text pages are in
``pipeline.testdata.images``). Every renderer takes a seed and varies its layout, palette, size
and style with it, so images of different seeds are different images of one kind (a
held-out set drawn from other seeds is not a copy of the example bank). RGB uint8 arrays.
No network, no files."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(8, int(size)))


def _words(rng: np.random.Generator, n: int) -> str:
    return " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(n))


def _color(rng: np.random.Generator, lo: int = 0, hi: int = 256) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(lo, hi, 3))


def _fig_to_rgb(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return np.asarray(Image.open(buf).convert("RGB"))


def _smooth_field(rng: np.random.Generator, n: int, scale: float) -> np.ndarray:
    """A smooth random 2-D field (low-pass filtered noise), n x n."""
    f = np.fft.fft2(rng.normal(size=(n, n)))
    k = np.fft.fftfreq(n)
    kk = np.sqrt(k[:, None] ** 2 + k[None, :] ** 2)
    return np.real(np.fft.ifft2(f * np.exp(-(kk * scale) ** 2)))


def _blob(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 120, rough: float = 0.25):
    """A closed coastline-like outline: a radial random walk around (cx, cy)."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    walk = np.cumsum(rng.normal(0, rough, n))
    walk -= np.linspace(0, walk[-1], n)  # closes the loop
    rad = r * np.exp(0.35 * (walk - walk.mean()))
    return cx + rad * np.cos(t), cy + rad * np.sin(t)


# --------------------------------------------------------------------------- maps

def map_image(seed: int) -> np.ndarray:
    """A map rendered by matplotlib, by seed: a coastline map (land blobs on water, a
    graticule, place labels, a scale bar), a choropleth (regions of a nearest-seed
    partition coloured by a value, with a colour bar), or a topographic map (filled
    contours with contour lines); most with a legend and a title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    w, h = float(rng.uniform(3.2, 5.0)), float(rng.uniform(2.6, 4.0))
    fig, ax = plt.subplots(figsize=(w, h), dpi=80)
    kind = seed % 3
    cmaps = ["viridis", "YlGn", "terrain", "OrRd", "Blues", "gist_earth", "PuBuGn", "cividis"]
    if kind == 0:
        ax.set_facecolor([0.55, 0.75, 0.95] if rng.random() < 0.7 else [0.9, 0.95, 1.0])
        land = [0.85, 0.8, 0.6] if rng.random() < 0.5 else [0.7, 0.85, 0.6]
        for _ in range(int(rng.integers(1, 5))):
            x, y = _blob(rng, rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(0.15, 0.5))
            ax.fill(x, y, color=land, ec="k", lw=0.8)
        for _ in range(int(rng.integers(2, 7))):
            px, py = rng.uniform(-0.8, 0.8, 2)
            ax.plot(px, py, "o", color="k", ms=3)
            ax.text(px + 0.03, py, _words(rng, 1).title(), fontsize=7)
        ax.plot([0.4, 0.8], [-0.85, -0.85], "k-", lw=3)
        ax.text(0.45, -0.8, f"{int(rng.integers(1, 50)) * 10} km", fontsize=6)
        ax.set_xlim(-1, 1)
        ax.set_ylim(-1, 1)
        ax.grid(True, ls=":", color="0.3")
    elif kind == 1:
        n = 120
        pts = rng.uniform(0, n, (int(rng.integers(6, 20)), 2))
        yy, xx = np.mgrid[0:n, 0:n]
        lab = ((xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2).argmin(-1)
        x, y = _blob(rng, n / 2, n / 2, n * 0.38, rough=0.15)
        from matplotlib.path import Path

        inside = Path(np.c_[x, y]).contains_points(np.c_[xx.ravel(), yy.ravel()]).reshape(n, n)
        val = rng.random(len(pts))[lab]
        val = np.where(inside, val, np.nan)
        im = ax.imshow(val, cmap=cmaps[int(rng.integers(len(cmaps)))], origin="lower")
        edge = (np.diff(lab, axis=0, prepend=lab[:1]) != 0) | (np.diff(lab, axis=1, prepend=lab[:, :1]) != 0)
        ax.contour(inside.astype(float), levels=[0.5], colors="k", linewidths=0.8)
        ax.imshow(np.where(edge & inside, 1.0, np.nan), cmap="gray", origin="lower", alpha=0.7)
        fig.colorbar(im, ax=ax, shrink=0.7)
        ax.set_xticks([])
        ax.set_yticks([])
    else:
        z = _smooth_field(rng, 100, float(rng.uniform(15, 40)))
        levels = int(rng.integers(6, 14))
        if rng.random() < 0.6:
            cf = ax.contourf(z, levels=levels, cmap=cmaps[int(rng.integers(len(cmaps)))])
            if rng.random() < 0.5:
                fig.colorbar(cf, ax=ax, shrink=0.7)
        cs = ax.contour(z, levels=levels, colors="k" if rng.random() < 0.5 else "sienna", linewidths=0.6)
        if rng.random() < 0.6:
            ax.clabel(cs, fontsize=5)
        for _ in range(int(rng.integers(0, 3))):  # a road or a river
            t = np.cumsum(rng.normal(0, 2, (40, 2)), axis=0) + rng.uniform(20, 80, 2)
            ax.plot(t[:, 0], t[:, 1], color="b" if rng.random() < 0.5 else "r", lw=1.2)
    if rng.random() < 0.6:
        from matplotlib.patches import Patch

        ax.legend(handles=[Patch(color=tuple(rng.random(3)), label=_words(rng, 1))
                           for _ in range(int(rng.integers(2, 5)))], fontsize=6, loc=["upper right", "lower left"][seed % 2])
    if rng.random() < 0.7:
        ax.set_title(_words(rng, int(rng.integers(1, 4))).title(), fontsize=9)
    return _fig_to_rgb(fig)


# --------------------------------------------------------------------------- drawings

def _smooth_path(rng: np.random.Generator, start, n: int, step: float, turn: float) -> list[tuple[float, float]]:
    ang = rng.uniform(0, 2 * np.pi)
    x, y = start
    out = [(x, y)]
    for _ in range(n):
        ang += rng.normal(0, turn)
        x, y = x + step * np.cos(ang), y + step * np.sin(ang)
        out.append((x, y))
    return out


def drawing(seed: int) -> np.ndarray:
    """A drawing with Pillow, by seed: line art (smooth pen strokes and outlined shapes),
    clip-art (flat-filled shapes with thick outlines: a house, a sun, a tree, a flower), a
    pen sketch (jittery hatching and contour strokes) or silhouettes (filled one-ink
    shapes), on white, cream or grey paper."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(280, 460)), int(rng.integers(240, 420))
    paper = [(255, 255, 255), (248, 243, 228), (235, 235, 235), (255, 252, 240)][int(rng.integers(4))]
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    kind = seed % 4
    ink = (20, 20, 20) if rng.random() < 0.7 else _color(rng, 0, 120)
    if kind == 3:  # silhouettes: filled shapes in one ink (cut-outs, icons, stencils)
        for _ in range(int(rng.integers(1, 4))):
            c = rng.uniform([0.25 * w, 0.25 * h], [0.75 * w, 0.75 * h])
            x, y = _blob(rng, c[0], c[1], float(rng.uniform(0.12, 0.3) * min(w, h)), n=80, rough=0.3)
            d.polygon(list(zip(x, y)), fill=ink)
            for _ in range(int(rng.integers(0, 5))):  # limbs, ears, stems
                a = rng.uniform(0, 2 * np.pi)
                ln, wd = rng.uniform(20, 70), int(rng.integers(4, 14))
                d.line([(c[0], c[1]), (c[0] + ln * 1.8 * np.cos(a), c[1] + ln * 1.8 * np.sin(a))], fill=ink, width=wd)
    elif kind == 0:
        for _ in range(int(rng.integers(4, 12))):
            p = _smooth_path(rng, rng.uniform([0, 0], [w, h]), int(rng.integers(20, 80)), float(rng.uniform(3, 8)), 0.3)
            d.line(p, fill=ink, width=int(rng.integers(1, 4)), joint="curve")
        for _ in range(int(rng.integers(1, 6))):
            x0, y0 = rng.uniform([0, 0], [w * 0.8, h * 0.8])
            s = rng.uniform(20, 90)
            box = [x0, y0, x0 + s, y0 + s * rng.uniform(0.5, 1.5)]
            (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, outline=ink, width=int(rng.integers(1, 4)))
    elif kind == 1:
        outline = int(rng.integers(2, 6))
        ground = int(h * rng.uniform(0.6, 0.85))
        if rng.random() < 0.6:
            d.rectangle([0, 0, w, ground], fill=_color(rng, 150, 256))
        d.rectangle([0, ground, w, h], fill=_color(rng, 60, 200), outline="black", width=outline)
        for _ in range(int(rng.integers(1, 4))):
            kind2 = int(rng.integers(4))
            cx, s = float(rng.uniform(0.1, 0.9) * w), float(rng.uniform(30, 80))
            if kind2 == 0:  # house
                d.rectangle([cx - s, ground - s, cx + s, ground], fill=_color(rng), outline="black", width=outline)
                d.polygon([(cx - s * 1.2, ground - s), (cx, ground - 2 * s), (cx + s * 1.2, ground - s)],
                          fill=_color(rng), outline="black", width=outline)
                d.rectangle([cx - s / 4, ground - s / 2, cx + s / 4, ground], fill=_color(rng), outline="black")
            elif kind2 == 1:  # sun
                cy = float(rng.uniform(0.1, 0.3) * h)
                for a in np.linspace(0, 2 * np.pi, 12, endpoint=False):
                    d.line([(cx, cy), (cx + 1.6 * s * np.cos(a), cy + 1.6 * s * np.sin(a))], fill="orange", width=3)
                d.ellipse([cx - s, cy - s, cx + s, cy + s], fill=(255, 220, 40), outline="black", width=outline)
            elif kind2 == 2:  # tree
                d.rectangle([cx - s / 5, ground - s * 1.5, cx + s / 5, ground], fill=(120, 70, 30), outline="black",
                            width=outline)
                d.ellipse([cx - s, ground - 2.8 * s, cx + s, ground - 1.2 * s], fill=(40, 160, 60), outline="black",
                          width=outline)
            else:  # flower
                cy = ground - 1.5 * s
                d.line([(cx, cy), (cx, ground)], fill=(30, 140, 30), width=4)
                for a in np.linspace(0, 2 * np.pi, 6, endpoint=False):
                    px, py = cx + 0.5 * s * np.cos(a), cy + 0.5 * s * np.sin(a)
                    d.ellipse([px - s / 3, py - s / 3, px + s / 3, py + s / 3], fill=_color(rng, 120), outline="black")
                d.ellipse([cx - s / 4, cy - s / 4, cx + s / 4, cy + s / 4], fill=(250, 210, 0), outline="black")
    else:
        for _ in range(int(rng.integers(2, 5))):  # contours, drawn again and again with jitter
            c = rng.uniform([0.2 * w, 0.2 * h], [0.8 * w, 0.8 * h])
            x, y = _blob(rng, c[0], c[1], float(rng.uniform(30, 110)), n=60, rough=0.2)
            for _ in range(int(rng.integers(1, 4))):
                jit = rng.normal(0, 2, (2, len(x)))
                d.line(list(zip(x + jit[0], y + jit[1])) + [(x[0], y[0])], fill=ink, width=1)
        for _ in range(int(rng.integers(3, 8))):  # hatched patches
            x0, y0 = rng.uniform([0, 0], [w, h])
            ang, ln = rng.uniform(0, np.pi), rng.uniform(10, 30)
            for k in range(int(rng.integers(6, 20))):
                ox, oy = x0 + 4 * k * np.sin(ang), y0 - 4 * k * np.cos(ang)
                d.line([(ox, oy), (ox + ln * np.cos(ang) + rng.normal(0, 1), oy + ln * np.sin(ang))], fill=ink)
    return np.asarray(img)


# --------------------------------------------------------------------------- screenshots

def screenshot(seed: int) -> np.ndarray:
    """A desktop application or web page drawn with Pillow, by seed: title bar with window
    buttons, a menu or tab bar, optionally a side panel and a toolbar, then a list/table, a
    form with text fields and buttons, or a text editor with line numbers; light or dark."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(420, 640)), int(rng.integers(300, 460))
    dark = rng.random() < 0.35
    bg = (32, 33, 36) if dark else (int(rng.integers(235, 256)),) * 3
    fg = (220, 220, 220) if dark else (30, 30, 30)
    panel = (45, 46, 50) if dark else (int(rng.integers(215, 238)),) * 3
    accent = _color(rng, 30, 220)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    fs = int(rng.integers(10, 15))
    font = _font(fs)
    bar = int(rng.integers(22, 34))
    d.rectangle([0, 0, w, bar], fill=(60, 60, 64) if dark else (int(rng.integers(200, 230)),) * 3)
    for i, c in enumerate([(237, 106, 94), (245, 191, 79), (98, 197, 84)]):
        if seed % 2:
            d.ellipse([8 + 18 * i, bar / 2 - 6, 20 + 18 * i, bar / 2 + 6], fill=c)
        else:
            d.text((w - 20 - 22 * i, bar / 2 - fs / 2), "x_-"[i], fill=fg, font=font)
    d.text((w / 2 - 40, bar / 2 - fs / 2), _words(rng, 2).title(), fill=fg, font=font)
    y = bar
    menu = int(rng.integers(18, 28))
    d.rectangle([0, y, w, y + menu], fill=panel)
    x = 8
    for _ in range(int(rng.integers(3, 7))):
        word = _words(rng, 1).title()
        d.text((x, y + menu / 2 - fs / 2), word, fill=fg, font=font)
        x += int(fs * 0.6 * len(word)) + 16
    y += menu
    left = 0
    if rng.random() < 0.6:
        left = int(rng.integers(90, 160))
        d.rectangle([0, y, left, h], fill=panel)
        for i in range(int((h - y) / (fs + 10))):
            if i == 2:
                d.rectangle([0, y + 6 + i * (fs + 10) - 2, left, y + 6 + (i + 1) * (fs + 10) - 4], fill=accent)
            d.text((12, y + 6 + i * (fs + 10)), _words(rng, 1), fill=fg, font=font)
    kind = seed % 3
    x0 = left + 14
    if kind == 0:  # table
        cols = int(rng.integers(3, 6))
        cw = (w - x0 - 14) / cols
        row = fs + int(rng.integers(8, 14))
        d.rectangle([x0, y + 10, w - 14, y + 10 + row], fill=accent)
        for r in range(int((h - y - 20) / row)):
            yy = y + 10 + r * row
            if r % 2 == 0 and r:
                d.rectangle([x0, yy, w - 14, yy + row], fill=panel)
            for c in range(cols):
                txt = _words(rng, 1) if c else str(int(rng.integers(1, 99999)))
                d.text((x0 + c * cw + 4, yy + 3), txt, fill=(255, 255, 255) if r == 0 else fg, font=font)
    elif kind == 1:  # form
        yy = y + 14
        while yy < h - 60:
            d.text((x0, yy), _words(rng, int(rng.integers(1, 3))).title() + ":", fill=fg, font=font)
            d.rectangle([x0 + 120, yy - 3, w - 20, yy + fs + 5], fill=bg, outline=(130, 130, 130), width=1)
            yy += fs + int(rng.integers(18, 28))
        for i in range(int(rng.integers(1, 4))):
            bx = w - 20 - (i + 1) * 90
            d.rounded_rectangle([bx, h - 45, bx + 80, h - 18], radius=5, fill=accent if i == 0 else panel,
                                outline=(120, 120, 120))
            d.text((bx + 14, h - 38), _words(rng, 1)[:7], fill=fg, font=font)
    else:  # editor
        code_font = _font(fs - 1)
        for i, yy in enumerate(range(y + 8, h - 10, fs + 4)):
            d.text((x0, yy), f"{i + 1:>3}", fill=(120, 120, 120), font=code_font)
            indent = 4 * int(rng.integers(0, 4)) * fs * 0.3
            for j, word in enumerate(_words(rng, int(rng.integers(1, 6))).split()):
                col = accent if j == 0 else fg
                d.text((x0 + 40 + indent + j * fs * 4, yy), word, fill=col, font=code_font)
    return np.asarray(img)


# --------------------------------------------------------------------------- slides, documents

def slide(seed: int) -> np.ndarray:
    """A presentation slide drawn with Pillow: a coloured header band or title, bullet
    points, and by seed a box of bars, a picture placeholder or a two-column layout."""
    rng = np.random.default_rng(seed)
    w = int(rng.integers(400, 640))
    h = int(w * (0.5625 if rng.random() < 0.6 else 0.75))
    theme = _color(rng, 20, 200)
    bg = (255, 255, 255) if rng.random() < 0.6 else _color(rng, 225, 256)
    img = Image.new("RGB", (w, h), bg)
    d = ImageDraw.Draw(img)
    tfs = int(rng.integers(18, 30))
    if rng.random() < 0.5:
        d.rectangle([0, 0, w, tfs * 2.2], fill=theme)
        d.text((20, tfs * 0.5), _words(rng, 3).title(), fill=(255, 255, 255), font=_font(tfs))
    else:
        d.text((20, 14), _words(rng, 3).title(), fill=theme, font=_font(tfs))
        d.line([(20, tfs * 2), (w - 20, tfs * 2)], fill=theme, width=3)
    fs = int(rng.integers(11, 17))
    y = int(tfs * 2.8)
    split = w * (0.55 if seed % 3 else 0.95)
    while y < h - 30:
        d.ellipse([24, y + fs / 3, 24 + fs / 2, y + fs / 3 + fs / 2], fill=theme)
        d.text((24 + fs, y), _words(rng, int(rng.integers(2, 6))), fill=(40, 40, 40), font=_font(fs))
        y += fs + int(rng.integers(10, 20))
    if seed % 3 == 1:
        vals = rng.random(int(rng.integers(3, 7)))
        bw = (w - split - 30) / len(vals)
        for i, v in enumerate(vals):
            d.rectangle([split + 10 + i * bw, h - 30 - v * (h * 0.5), split + 10 + (i + 0.7) * bw, h - 30],
                        fill=_color(rng, 40, 220))
        d.line([(split + 5, h - 30), (w - 10, h - 30)], fill=(0, 0, 0), width=2)
    elif seed % 3 == 2:
        d.rectangle([split + 10, tfs * 3, w - 20, h - 30], fill=(200, 200, 200), outline=(120, 120, 120))
        d.line([(split + 10, tfs * 3), (w - 20, h - 30)], fill=(120, 120, 120))
        d.line([(split + 10, h - 30), (w - 20, tfs * 3)], fill=(120, 120, 120))
    return np.asarray(img)


def document(seed: int) -> np.ndarray:
    """A typeset document page drawn with Pillow: headings, justified-looking paragraphs in
    one or two columns, and by seed a ruled table or a figure box with a caption; on white,
    cream or grey paper, about a third of them scanned-looking (grey, unevenly lit, turned
    a few degrees on a darker bed, softened, noisy)."""
    rng = np.random.default_rng(seed)
    w = int(rng.integers(340, 440))
    h = int(w * rng.uniform(1.25, 1.45))
    paper = [(255, 255, 255), (247, 242, 228), (232, 232, 228)][int(rng.integers(3))]
    img = Image.new("RGB", (w, h), paper)
    d = ImageDraw.Draw(img)
    fs = int(rng.integers(8, 12))
    font, head = _font(fs), _font(fs + int(rng.integers(3, 8)))
    ncol = 1 + int(rng.random() < 0.4)
    margin = int(rng.integers(20, 40))
    colw = (w - 2 * margin - (ncol - 1) * 14) / ncol
    d.text((margin, margin), _words(rng, int(rng.integers(2, 6))).title(), fill=(0, 0, 0), font=head)
    top = margin + fs * 3
    extra = seed % 3
    for c in range(ncol):
        x0 = margin + c * (colw + 14)
        y = top
        while y < h - margin - fs:
            r = rng.random()
            if r < 0.08:
                d.text((x0, y), _words(rng, 2).title(), fill=(0, 0, 0), font=head)
                y += fs * 2 + 4
            elif r < 0.12 and extra and y < h * 0.6:
                bh = int(rng.uniform(0.12, 0.25) * h)
                if extra == 1:  # ruled table
                    rows, cols = int(rng.integers(3, 7)), int(rng.integers(2, 5))
                    for i in range(rows + 1):
                        d.line([(x0, y + i * bh / rows), (x0 + colw, y + i * bh / rows)], fill=(0, 0, 0))
                    for i in range(rows):
                        for j in range(cols):
                            d.text((x0 + 3 + j * colw / cols, y + 2 + i * bh / rows), _words(rng, 1)[:6],
                                   fill=(0, 0, 0), font=font)
                else:  # figure box
                    d.rectangle([x0, y, x0 + colw, y + bh], outline=(0, 0, 0))
                    p = _smooth_path(rng, (x0 + 5, y + bh / 2), 30, colw / 32, 0.4)
                    d.line([(min(max(px, x0), x0 + colw), min(max(py, y), y + bh)) for px, py in p], fill=(0, 0, 0))
                y += bh + 4
                d.text((x0, y), "Fig. " + _words(rng, 4), fill=(0, 0, 0), font=font)
                y += fs * 2
            else:
                n = max(1, int(colw / (fs * 3.3)))
                d.text((x0, y), _words(rng, n), fill=(15, 15, 15), font=font)
                y += fs + int(rng.integers(3, 6))
    a = np.asarray(img)
    if paper[0] == 232 or rng.random() < 0.3:
        a = _scanned(a, rng)
    return a


def _scanned(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A scanned or photographed page: grey, unevenly lit, slightly turned on a darker bed,
    softened, with sensor noise."""
    from PIL import ImageFilter

    h, w = a.shape[:2]
    g = a.mean(axis=2)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    light = 1.0 - rng.uniform(0.1, 0.45) * ((xx - rng.uniform()) ** 2 + (yy - rng.uniform()) ** 2)
    g = g * light * rng.uniform(0.8, 1.0)
    bed = int(rng.integers(40, 140))
    im = Image.fromarray(np.clip(g, 0, 255).astype(np.uint8)).rotate(
        float(rng.uniform(-4, 4)), resample=Image.Resampling.BILINEAR, expand=True, fillcolor=bed)
    im = im.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.2))))
    g = np.asarray(im, dtype=np.float32) + rng.normal(0, rng.uniform(2, 8), (im.size[1], im.size[0]))
    g = np.clip(g, 0, 255).astype(np.uint8)
    return np.stack([g] * 3, axis=-1)


RENDERERS = {"map": map_image, "drawing": drawing, "screenshot": screenshot, "slide": slide, "document": document}


def render(kind: str, seed: int) -> np.ndarray:
    """One image of ``kind``: a key of ``RENDERERS``, or 'chart' / 'text' (``pipeline.testdata.images``)."""
    from pipeline.testdata import images

    if kind == "chart":
        return images.chart_image(seed)
    if kind == "text":
        return images.text_page(seed)
    return RENDERERS[kind](seed)
