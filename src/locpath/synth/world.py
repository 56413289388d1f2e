"""The synthetic slide world: a label map per slide whose slide-level answers are known.

A slide is tissue (organ parenchyma and stroma) on a white background. The organ is a global property
(its parenchyma texture covers most tissue). The diagnosis and grade are decided by one sparse region of
tumour (at most 5 % of tissue tiles); benign slides have none. Necrosis, when present, is a second small
region. Labels live on a grid of CELL_UM micron cells, so one spec renders at any scan resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .textures import CLASS_NAMES, T, VARIANTS, texture_bank

CELL_UM = 8.0  # label cell side in microns (16 px at 0.5 um/px)
TILE_UM = 112.0  # reference tile: 224 px at 0.5 um/px
CELLS_PER_TILE = int(TILE_UM / CELL_UM)  # 14
TEX_MPP = 0.5  # textures are drawn at 0.5 um/px
MAX_DIAGNOSTIC_FRACTION = 0.05

ORGANS = ("colon", "lung", "breast", "kidney")
DIAGNOSES = ("benign", "adenocarcinoma", "squamous cell carcinoma")
GRADES = ("low grade", "high grade")
CLASS = {name: i for i, name in enumerate(CLASS_NAMES)}
BACKGROUND, STROMA, NECROSIS = CLASS["background"], CLASS["stroma"], CLASS["necrosis"]
TUMOUR_CLASSES = tuple(CLASS[f"{d} {g}"] for d in DIAGNOSES[1:] for g in GRADES)


@dataclass
class SlideSpec:
    seed: int
    organ: str
    diagnosis: str
    grade: str | None  # None for benign
    necrosis: bool
    mpp: float  # level-0 microns per pixel of the rendered slide
    labels: np.ndarray  # uint8 (rows, cols) of CELL_UM cells
    variants: np.ndarray  # int (classes,) texture variant per class
    offsets: np.ndarray  # int (classes, 2) texture offsets
    stain: np.ndarray  # float32 (3,) per-channel optical-density scale (stain variation)
    meta: dict = field(default_factory=dict)

    @property
    def dimensions(self) -> tuple[int, int]:
        rows, cols = self.labels.shape
        px = CELL_UM / self.mpp
        return int(round(cols * px)), int(round(rows * px))

    def ground_truth(self) -> dict:
        meta = {k: v for k, v in self.meta.items() if not k.startswith("_")}
        return {
            "seed": self.seed,
            "organ": self.organ,
            "diagnosis": self.diagnosis,
            "grade": self.grade or "no tumor",
            "necrosis": "yes" if self.necrosis else "no",
            "mpp": self.mpp,
            "dimensions": list(self.dimensions),
            "tissue_fraction": float((self.labels != BACKGROUND).mean()),
            **meta,
        }

    def tissue_mask(self) -> np.ndarray:
        """Ground-truth tissue at label-cell resolution (CELL_UM per cell)."""
        return self.labels != BACKGROUND

    def tile_labels(self, tile_cells: int = CELLS_PER_TILE) -> tuple[np.ndarray, np.ndarray]:
        """Per reference tile: fraction of each class, (rows, cols, classes). And the tile grid shape."""
        rows, cols = self.labels.shape[0] // tile_cells, self.labels.shape[1] // tile_cells
        lab = self.labels[: rows * tile_cells, : cols * tile_cells]
        blocks = lab.reshape(rows, tile_cells, cols, tile_cells).transpose(0, 2, 1, 3).reshape(rows, cols, -1)
        frac = np.stack([(blocks == c).mean(-1) for c in range(len(CLASS_NAMES))], axis=-1)
        return frac, np.array([rows, cols])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_cells: float) -> np.ndarray:
    """Low-frequency noise in [-1, 1] on a (rows, cols) grid, features about `scale_cells` cells wide."""
    gh = max(2, int(np.ceil(shape[0] / scale_cells)) + 2)
    gw = max(2, int(np.ceil(shape[1] / scale_cells)) + 2)
    coarse = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    img = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(img)


def _blob(rng, shape, center, radius) -> np.ndarray:
    rows, cols = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    ang = np.arctan2(rows - center[0], cols - center[1])
    wobble = 1 + 0.18 * np.sin(3 * ang + rng.uniform(0, 6.28)) + 0.1 * np.sin(5 * ang + rng.uniform(0, 6.28))
    d = np.hypot(rows - center[0], cols - center[1]) / wobble
    return d <= radius


def _tiles_touched(region: np.ndarray, tissue_tiles: np.ndarray, min_frac: float = 0.02) -> tuple[int, int]:
    """(tiles with any share of `region`, tiles where region is the majority), among tissue tiles."""
    c = CELLS_PER_TILE
    rows, cols = region.shape[0] // c, region.shape[1] // c
    frac = region[: rows * c, : cols * c].reshape(rows, c, cols, c).mean(axis=(1, 3))
    return int(((frac > min_frac) & tissue_tiles).sum()), int((frac >= 0.5).sum())


def _tissue_tiles(tissue: np.ndarray, min_frac: float = 0.25) -> np.ndarray:
    c = CELLS_PER_TILE
    rows, cols = tissue.shape[0] // c, tissue.shape[1] // c
    return tissue[: rows * c, : cols * c].reshape(rows, c, cols, c).mean(axis=(1, 3)) >= min_frac


def _place_region(rng, tissue, tissue_tiles, taken, target_tiles, max_tiles):
    """A blob inside tissue touching at most max_tiles tissue tiles, majority in at least one tile."""
    # distance from background, roughly: erode by repeated min-filtering on the cell grid
    inner = tissue & ~taken
    from PIL import ImageFilter

    er = Image.fromarray((inner * 255).astype(np.uint8)).filter(ImageFilter.MinFilter(2 * (CELLS_PER_TILE // 2) + 1))
    candidates = np.argwhere(np.asarray(er) > 0)
    if len(candidates) == 0:
        candidates = np.argwhere(inner)
    # fall back to the centres of whole tissue tiles: a small blob there touches a single tile
    c = CELLS_PER_TILE
    tile_centres = np.argwhere(_tissue_tiles(inner, min_frac=1.0)) * c + c // 2
    radius = np.sqrt(target_tiles * CELLS_PER_TILE**2 / np.pi)
    for attempt in range(60):
        pool = candidates if attempt < 30 or len(tile_centres) == 0 else tile_centres
        if attempt == 30:
            radius = min(radius, 0.48 * c)
        center = pool[rng.integers(len(pool))]
        region = _blob(rng, tissue.shape, center, radius) & tissue & ~taken
        touched, majority = _tiles_touched(region, tissue_tiles)
        if touched <= max_tiles and majority >= 1:
            return region
        if touched > max_tiles:
            radius *= 0.92
        else:
            radius *= 1.04
    return None


def make_spec(
    seed: int,
    tiles: tuple[int, int] | None = None,
    mpp: float = 0.5,
    organ: str | None = None,
    diagnosis: str | None = None,
    grade: str | None = None,
    necrosis: bool | None = None,
) -> SlideSpec:
    """Sample one slide of the world, deterministically from `seed`. `tiles` = (columns, rows) of 224 px
    reference tiles; default 14..20 each way."""
    rng = np.random.default_rng([seed, 7919])
    organ = organ or ORGANS[rng.integers(len(ORGANS))]
    diagnosis = diagnosis or DIAGNOSES[rng.integers(len(DIAGNOSES))]
    if organ not in ORGANS:
        raise ConfigError(f"unknown organ {organ!r}; choose from {ORGANS}")
    if diagnosis not in DIAGNOSES:
        raise ConfigError(f"unknown diagnosis {diagnosis!r}; choose from {DIAGNOSES}")
    if diagnosis == "benign":
        grade = None
    else:
        grade = grade or GRADES[rng.integers(len(GRADES))]
        if grade not in GRADES:
            raise ConfigError(f"unknown grade {grade!r}; choose from {GRADES}")
    necrosis = bool(rng.integers(2)) if necrosis is None else bool(necrosis)
    if tiles is None:
        tiles = (int(rng.integers(14, 21)), int(rng.integers(14, 21)))
    cols, rows = tiles[0] * CELLS_PER_TILE, tiles[1] * CELLS_PER_TILE
    shape = (rows, cols)

    for _attempt in range(20):
        # tissue: one to three ellipses with a noisy border
        yy, xx = np.mgrid[0:rows, 0:cols].astype(np.float32)
        field_ = np.full(shape, -1e9, np.float32)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.3, 0.7) * rows, rng.uniform(0.3, 0.7) * cols
            ry, rx = rng.uniform(0.25, 0.42) * rows, rng.uniform(0.25, 0.42) * cols
            a = rng.uniform(0, np.pi)
            u = ((xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)) / rx
            v = (-(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)) / ry
            field_ = np.maximum(field_, 1 - np.sqrt(u * u + v * v))
        field_ += 0.25 * _smooth_noise(rng, shape, 3 * CELLS_PER_TILE)
        tissue = field_ > 0
        border = 2  # keep a white margin like a real glass slide
        tissue[:border] = tissue[-border:] = False
        tissue[:, :border] = tissue[:, -border:] = False
        frac = tissue.mean()
        if 0.25 <= frac <= 0.75:
            break
    labels = np.full(shape, BACKGROUND, np.uint8)
    parenchyma = _smooth_noise(rng, shape, 2 * CELLS_PER_TILE) > -0.35
    labels[tissue] = STROMA
    labels[tissue & parenchyma] = CLASS[organ]

    tissue_tiles = _tissue_tiles(tissue)
    n_tissue_tiles = int(tissue_tiles.sum())
    max_tiles = max(1, int(np.floor(MAX_DIAGNOSTIC_FRACTION * n_tissue_tiles)))
    taken = np.zeros(shape, bool)
    meta: dict = {"tissue_tiles": n_tissue_tiles}
    if diagnosis != "benign":
        target = max(1.2, min(0.55 * max_tiles, 0.03 * n_tissue_tiles))
        region = _place_region(rng, tissue, tissue_tiles, taken, target, max_tiles)
        if region is None:
            raise ConfigError(f"seed {seed}: a {tiles[0]}x{tiles[1]}-tile slide has too little tissue "
                              f"({n_tissue_tiles} tiles) for a sparse diagnostic region; use a larger slide")
        labels[region] = CLASS[f"{diagnosis} {grade}"]
        taken |= region
        touched, majority = _tiles_touched(region, tissue_tiles)
        meta.update(diagnostic_tiles=touched, diagnostic_fraction=round(touched / max(n_tissue_tiles, 1), 4))
    else:
        meta.update(diagnostic_tiles=0, diagnostic_fraction=0.0)
    if necrosis:
        target = max(1.2, min(0.55 * max_tiles, 0.03 * n_tissue_tiles))
        region = _place_region(rng, tissue, tissue_tiles, taken, target, max_tiles)
        if region is None:
            raise ConfigError(f"seed {seed}: a {tiles[0]}x{tiles[1]}-tile slide has too little tissue "
                              f"({n_tissue_tiles} tiles) for a necrosis region; use a larger slide")
        labels[region] = NECROSIS
        meta["necrosis_tiles"] = _tiles_touched(region, tissue_tiles)[0]

    n_cls = len(CLASS_NAMES)
    return SlideSpec(
        seed=seed,
        organ=organ,
        diagnosis=diagnosis,
        grade=grade,
        necrosis=necrosis,
        mpp=float(mpp),
        labels=labels,
        variants=rng.integers(0, VARIANTS, n_cls),
        offsets=rng.integers(0, T, (n_cls, 2)),
        stain=rng.uniform(0.85, 1.15, 3).astype(np.float32),
        meta=meta,
    )


def _slide_textures(spec: SlideSpec) -> np.ndarray:
    """This slide's textures, stain-jittered, flattened to (classes * T * T, 3) for one gather per render."""
    cached = spec.meta.get("_textures")
    if cached is not None:
        return cached
    bank = texture_bank()
    tex = bank[np.arange(len(CLASS_NAMES)), spec.variants]  # (classes, T, T, 3)
    # stain variation: scale optical density per channel, white stays white
    od = 255.0 - tex.astype(np.float32)
    tex = np.clip(255.0 - od * spec.stain, 0, 255).astype(np.uint8)
    flat = np.ascontiguousarray(tex.reshape(-1, 3))
    spec.meta["_textures"] = flat
    return flat


def render_region(spec: SlideSpec, x: int, y: int, w: int, h: int) -> np.ndarray:
    """RGB uint8 (h, w, 3) of level-0 pixels [x, x+w) x [y, y+h)."""
    flat = _slide_textures(spec)
    f = spec.mpp / TEX_MPP  # texture pixels per slide pixel
    u = np.floor((np.arange(x, x + w) + 0.5) * f).astype(np.int64)
    v = np.floor((np.arange(y, y + h) + 0.5) * f).astype(np.int64)
    cell_px = int(CELL_UM / TEX_MPP)
    rows, cols = spec.labels.shape
    padded = np.pad(spec.labels, 1, constant_values=BACKGROUND)  # outside the label map is background
    lc = np.clip(u // cell_px + 1, 0, cols + 1)
    lr = np.clip(v // cell_px + 1, 0, rows + 1)
    lab = padded[np.ix_(lr, lc)].astype(np.int32)
    ox, oy = spec.offsets[0]
    tu = ((u + ox) % T).astype(np.int32)
    tv = ((v + oy) % T).astype(np.int32)
    idx = lab * (T * T)
    idx += tv[:, None] * T
    idx += tu[None, :]
    return flat[idx]


def render_levels(spec: SlideSpec, downsamples=(1,)) -> list[np.ndarray]:
    """Whole-slide arrays per level (for small slides and in-memory use)."""
    w, h = spec.dimensions
    full = render_region(spec, 0, 0, w, h)
    out = [full]
    for ds in downsamples[1:]:
        out.append(np.asarray(Image.fromarray(full).resize((max(1, w // ds), max(1, h // ds)), Image.Resampling.BOX)))
    return out
