"""Procedural H&E-like textures, one per tissue class, periodic so any region renders by indexing.

A texture bank is generated once per process (a few variants per class, fixed seeds); each slide picks a
variant, an offset and a stain jitter, so slides differ without regenerating textures.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

T = 256  # texture period in pixels at 0.5 um/px

# (R, G, B) anchors: eosin pink, hematoxylin purple, white space
EOSIN = np.array([236, 160, 196], np.float32)
PALE_EOSIN = np.array([242, 196, 218], np.float32)
HEMATOX = np.array([78, 48, 128], np.float32)
WHITE = np.array([246, 244, 246], np.float32)
# airy tissue (alveoli, fat) is pale but still tinted, as a lightly stained section is
ALVEOLAR = np.array([234, 194, 220], np.float32)
FAT = np.array([238, 200, 224], np.float32)


def _grid():
    y, x = np.mgrid[0:T, 0:T].astype(np.float32)
    return x, y


def _periodic_dist(x, y, cx, cy):
    dx = np.abs(x - cx)
    dy = np.abs(y - cy)
    dx = np.minimum(dx, T - dx)
    dy = np.minimum(dy, T - dy)
    return dx, dy


def _blend(img, mask, color, strength=1.0):
    m = np.clip(mask, 0.0, 1.0)[..., None] * strength
    img[:] = img * (1 - m) + color[None, None, :] * m


def _window(cx, cy, rad):
    """Periodic index window of half-size `rad` around (cx, cy) and the offsets from the centre."""
    ix, iy = int(cx), int(cy)
    xs = np.arange(ix - rad, ix + rad + 1) % T
    ys = np.arange(iy - rad, iy + rad + 1) % T
    gx, gy = np.meshgrid(np.arange(-rad, rad + 1) + (ix - cx), np.arange(-rad, rad + 1) + (iy - cy))
    return np.ix_(ys, xs), gx.astype(np.float32), gy.astype(np.float32)


def _paint(img, idx, mask, color):
    m = np.clip(mask, 0.0, 1.0)[..., None]
    img[idx] = img[idx] * (1 - m) + color[None, None, :] * m


def _dots(rng, img, count, r_lo, r_hi, color, elong=1.0, jitter_color=8.0):
    """Stamp `count` (elliptical) nuclei, periodic at the borders."""
    for _ in range(count):
        cx, cy = rng.uniform(0, T, 2)
        r = rng.uniform(r_lo, r_hi)
        ang = rng.uniform(0, np.pi)
        idx, gx, gy = _window(cx, cy, int(np.ceil(r * elong)) + 2)
        u = gx * np.cos(ang) + gy * np.sin(ang)
        v = -gx * np.sin(ang) + gy * np.cos(ang)
        d = np.sqrt((u / (r * elong)) ** 2 + (v / r) ** 2)
        c = color + rng.normal(0, jitter_color, 3).astype(np.float32)
        _paint(img, idx, (1.2 - d) / 0.4, c)


def _rings(rng, img, count, r_lo, r_hi, wall, lumen, nuclei, nuc_r=2.2, nuc_step=5.0, lumen_color=WHITE):
    """Glands/tubules: a lumen, a cellular wall, and nuclei along the wall."""
    for _ in range(count):
        cx, cy = rng.uniform(0, T, 2)
        r = rng.uniform(r_lo, r_hi)
        idx, gx, gy = _window(cx, cy, int(r) + 6)
        d = np.sqrt(gx * gx + gy * gy)
        _paint(img, idx, (r + 3 - d) / 2, wall)
        _paint(img, idx, (r * lumen - d) / 1.5, lumen_color)
        n = max(3, int(2 * np.pi * r * 0.85 / nuc_step))
        for k in range(n):
            a = 2 * np.pi * k / n + rng.normal(0, 0.05)
            px, py = cx + np.cos(a) * r * 0.82, cy + np.sin(a) * r * 0.82
            nidx, nx, ny = _window(px, py, int(nuc_r) + 2)
            _paint(img, nidx, (nuc_r + 0.8 - np.sqrt(nx * nx + ny * ny)) / 0.8, nuclei)


def _voronoi_edges(rng, n_points, width):
    """Distance-to-boundary field of a periodic Voronoi diagram: ~0 on cell borders."""
    x, y = _grid()
    pts = rng.uniform(0, T, (n_points, 2))
    d1 = np.full((T, T), np.inf, np.float32)
    d2 = np.full((T, T), np.inf, np.float32)
    for px, py in pts:
        dx, dy = _periodic_dist(x, y, px, py)
        d = np.sqrt(dx * dx + dy * dy)
        d2 = np.where(d < d1, d1, np.minimum(d2, d))
        d1 = np.minimum(d1, d)
    return np.clip(1 - (d2 - d1) / width, 0, 1), d1


def _base(rng, color, noise=6.0):
    img = np.empty((T, T, 3), np.float32)
    img[:] = color
    img += rng.normal(0, noise, (T, T, 1)).astype(np.float32)
    return img


def _fibres(rng, img, color, freq, strength):
    x, y = _grid()
    ang = rng.uniform(0, np.pi)
    k = round(freq * T / (2 * np.pi))  # integer cycles per period keeps it periodic
    kx, ky = round(k * np.cos(ang)), round(k * np.sin(ang))
    phase = 2 * np.pi * (kx * x + ky * y) / T
    wob = 1.5 * np.sin(2 * np.pi * (2 * x + 3 * y) / T)
    _blend(img, (0.5 + 0.5 * np.sin(phase + wob)) ** 3, color, strength)


def _make(cls: str, rng: np.random.Generator) -> np.ndarray:
    if cls == "background":
        img = _base(rng, WHITE, 1.5)
    elif cls == "stroma":
        img = _base(rng, PALE_EOSIN, 4)
        _fibres(rng, img, EOSIN, 0.35, 0.8)
        _dots(rng, img, 25, 1.6, 2.2, HEMATOX + 30, elong=2.8)
    elif cls == "colon":
        img = _base(rng, PALE_EOSIN, 5)
        _rings(rng, img, 10, 16, 24, EOSIN + [-10, -20, 0], 0.55, HEMATOX, nuc_r=2.2, nuc_step=6)
        _dots(rng, img, 60, 1.4, 2.0, HEMATOX + 40)
    elif cls == "lung":
        img = _base(rng, ALVEOLAR, 3)
        edges, _ = _voronoi_edges(rng, 30, 5.0)
        _blend(img, edges, EOSIN)
        _dots(rng, img, 40, 1.6, 2.2, HEMATOX + 20)
    elif cls == "breast":
        img = _base(rng, FAT, 3)
        edges, _ = _voronoi_edges(rng, 12, 3.0)
        _blend(img, edges, PALE_EOSIN - 20)
        _rings(rng, img, 2, 10, 14, EOSIN, 0.4, HEMATOX, nuc_r=2.0, nuc_step=4.5)
    elif cls == "kidney":
        img = _base(rng, EOSIN + [-6, -30, -10], 5)
        _rings(rng, img, 45, 8, 11, EOSIN + [-16, -50, -20], 0.35, HEMATOX + 10, nuc_r=1.8, nuc_step=5.5,
               lumen_color=PALE_EOSIN)
    elif cls == "adenocarcinoma low grade":
        img = _base(rng, (EOSIN + HEMATOX) / 2 + [40, 30, 30], 6)
        _rings(rng, img, 24, 9, 15, HEMATOX + [60, 40, 50], 0.45, HEMATOX - 10, nuc_r=2.6, nuc_step=4.0)
    elif cls == "adenocarcinoma high grade":
        img = _base(rng, (EOSIN + HEMATOX) / 2 + [10, 0, 10], 8)
        _dots(rng, img, 700, 3.2, 5.0, HEMATOX - 25, jitter_color=14)
        _rings(rng, img, 4, 8, 12, HEMATOX + 40, 0.4, HEMATOX - 30, nuc_r=3.0, nuc_step=4.0)
    elif cls == "squamous cell carcinoma low grade":
        img = _base(rng, EOSIN + [0, 10, -10], 5)
        edges, _ = _voronoi_edges(rng, 70, 2.5)
        _blend(img, edges, EOSIN - [40, 70, 40])
        x, y = _grid()
        for _ in range(3):  # keratin pearls: concentric orange-pink whorls
            cx, cy = rng.uniform(0, T, 2)
            dx, dy = _periodic_dist(x, y, cx, cy)
            d = np.sqrt(dx * dx + dy * dy)
            whorl = (0.5 + 0.5 * np.sin(d * 0.9)) * np.clip((22 - d) / 4, 0, 1)
            _blend(img, whorl, np.array([240, 150, 120], np.float32), 0.9)
        _dots(rng, img, 70, 2.2, 3.0, HEMATOX + 10)
    elif cls == "squamous cell carcinoma high grade":
        img = _base(rng, EOSIN + [-20, -20, -20], 7)
        edges, _ = _voronoi_edges(rng, 90, 2.0)
        _blend(img, edges, EOSIN - [60, 90, 50])
        _dots(rng, img, 260, 3.5, 5.5, HEMATOX - 30, jitter_color=12)
    elif cls == "necrosis":
        # coagulative necrosis: intensely eosinophilic, structureless, dusted with nuclear debris (karyorrhexis)
        img = _base(rng, np.array([232, 118, 150], np.float32), 10)
        _fibres(rng, img, np.array([214, 96, 132], np.float32), 0.12, 0.6)
        _dots(rng, img, 1400, 0.6, 1.4, HEMATOX - 20, jitter_color=20)
    else:
        raise KeyError(cls)
    return np.clip(img, 0, 255).astype(np.uint8)


CLASS_NAMES = (
    "background",
    "stroma",
    "colon",
    "lung",
    "breast",
    "kidney",
    "adenocarcinoma low grade",
    "adenocarcinoma high grade",
    "squamous cell carcinoma low grade",
    "squamous cell carcinoma high grade",
    "necrosis",
)
VARIANTS = 3


@lru_cache(maxsize=1)
def texture_bank() -> np.ndarray:
    """(classes, variants, T, T, 3) uint8; deterministic."""
    bank = np.empty((len(CLASS_NAMES), VARIANTS, T, T, 3), np.uint8)
    for c, name in enumerate(CLASS_NAMES):
        for v in range(VARIANTS):
            bank[c, v] = _make(name, np.random.default_rng([1234, c, v]))
    return bank
