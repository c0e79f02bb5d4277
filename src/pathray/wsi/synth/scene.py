"""The vector scene of a synthetic slide: tissue, Gleason class regions drawn as patterns, nuclei."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from pathray.wsi.annotations.classes import NUCLEUS_CLASSES
from pathray.wsi.annotations.geojson import Annotation
from pathray.wsi.annotations.geometry import points_in_ring, ring_area
from pathray.wsi.synth import materials

PATTERNS = ("Benign", "G3", "G4", "G5")
"""Slide-level primary patterns; slide seed ``s`` gets ``PATTERNS[s % 4]``: 4 seeds in a row cover all."""

_TUMOUR = ("G3", "G4", "G5")
_STROMA_NUCLEI_PER_MM2 = 900.0


@dataclass(frozen=True, eq=False)
class ClassRegion:
    """An annotated region: a simple polygon (level-0 px, open ring) drawn with its class's pattern."""

    class_name: str
    polygon: np.ndarray


@dataclass(frozen=True, eq=False)
class SlideGeometry:
    """Everything a synthetic slide shows, as vectors in level-0 px; every level is rendered from it.

    Tissue outside the class regions is unannotated stroma (Background for segmentation).
    Shapes are filled in order with tissue codes (see ``synth_render``); nuclei are sorted by y.
    """

    seed: int
    width: int
    height: int
    mpp: float
    label: str
    tissue: tuple[np.ndarray, ...]
    regions: tuple[ClassRegion, ...]
    shape_codes: np.ndarray
    shape_polygons: tuple[np.ndarray, ...]
    shape_bounds: np.ndarray
    nuclei_xy: np.ndarray
    nuclei_radius: np.ndarray
    nuclei_class: np.ndarray
    stain: np.ndarray

    def annotations(self) -> list[Annotation]:
        """Regions as Polygons, nuclei as one MultiPoint "points" annotation per nucleus class."""
        out = [
            Annotation(
                {"type": "Polygon", "coordinates": [np.vstack([r.polygon, r.polygon[:1]]).tolist()]},
                r.class_name,
            )
            for r in self.regions
        ]
        for cls in NUCLEUS_CLASSES:
            points = self.nuclei_xy[self.nuclei_class == cls.index]
            if len(points):
                out.append(Annotation({"type": "MultiPoint", "coordinates": points.tolist()}, cls.name))
        return out


def _boundary_distance(points: np.ndarray, poly: np.ndarray) -> np.ndarray:
    a, ab = poly, np.roll(poly, -1, axis=0) - poly
    out = np.empty(len(points))
    for s in range(0, len(points), 2048):
        ap = points[s : s + 2048, None, :] - a[None]
        t = np.clip((ap * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-12), 0, 1)
        out[s : s + 2048] = np.hypot(*np.moveaxis(ap - t[..., None] * ab, -1, 0)).min(axis=1)
    return out


def _radial(rng: np.random.Generator, n: int, amp: float, count: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``count`` smooth star-shaped radius profiles around 1 (harmonics 2-4, each up to ``amp``)."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rho = np.ones((count, n))
    for k in (2, 3, 4):
        a, phase = rng.uniform(0, amp, (count, 1)), rng.uniform(0, 2 * np.pi, (count, 1))
        rho += a * np.cos(k * theta + phase)
    return theta, rho


def _ring(cx: float, cy: float, theta: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1)


def _pack(
    rng: np.random.Generator,
    poly: np.ndarray,
    radius: tuple[float, float],
    gap: float,
    fill: float,
    amp: float,
    vertices: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-overlapping star shapes inside ``poly`` covering about ``fill`` of it, largest first.

    Returns the vertex angles, the centres (k, 2) and each shape's radius per angle (k, vertices).
    """
    rmin, rmax = radius
    target = max(1, int(fill * ring_area(poly) / (np.pi * ((rmin + rmax) / 2) ** 2)))
    m = 20 * target + 64
    centres = rng.uniform(poly.min(0), poly.max(0), (m, 2))
    theta, rho = _radial(rng, vertices, amp, m)
    radii = np.sort(rng.uniform(rmin, rmax, m))[::-1, None] * rho
    bound = radii.max(axis=1)
    ok = points_in_ring(centres, poly)
    ok[ok] = _boundary_distance(centres[ok], poly) >= bound[ok] + gap / 2
    centres, radii, bound = centres[ok], radii[ok], bound[ok]
    cell = 2 * float(bound.max(initial=0)) + gap  # accepted shapes are hashed into cells this wide
    grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}
    keep: list[int] = []
    for i, ((x, y), b) in enumerate(zip(centres.tolist(), bound.tolist(), strict=True)):
        gx, gy = int(x // cell), int(y // cell)
        near = (grid.get((gx + dx, gy + dy), ()) for dx in (-1, 0, 1) for dy in (-1, 0, 1))
        if any((x - ox) ** 2 + (y - oy) ** 2 < (b + ob + gap) ** 2 for items in near for ox, oy, ob in items):
            continue
        grid.setdefault((gx, gy), []).append((x, y, b))
        keep.append(i)
        if len(keep) >= target:
            break
    return theta, centres[keep], radii[keep]


def _hex_points(rng: np.random.Generator, poly: np.ndarray, spacing: float, jitter: float) -> np.ndarray:
    (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
    ys = np.arange(y0, y1, spacing * math.sqrt(3) / 2)
    xs = np.arange(x0, x1, spacing)
    gx, gy = np.meshgrid(xs, ys)
    gx = gx + (np.arange(len(ys))[:, None] % 2) * spacing / 2
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(-jitter, jitter, (gx.size, 2))
    return pts[points_in_ring(pts, poly)]


class _Scene:
    """Shapes (code, polygon) in drawing order and nuclei (x, y, rx, ry, class) being generated."""

    def __init__(self, rng: np.random.Generator, um: float) -> None:
        self.rng, self.um = rng, um
        self.codes: list[int] = []
        self.polygons: list[np.ndarray] = []
        self.structures: list[np.ndarray] = []  # where stromal nuclei must not go
        self.nuclei: list[np.ndarray] = []

    def shape(self, code: int, poly: np.ndarray, structure: bool = False) -> None:
        self.codes.append(code)
        self.polygons.append(poly)
        if structure:
            self.structures.append(poly)

    def add_nuclei(self, xy: np.ndarray, radius_um: float, cls: str, elongation: float = 0.12) -> None:
        n = len(xy)
        e = self.rng.uniform(-elongation, elongation, n)
        r = radius_um * self.um * self.rng.uniform(0.9, 1.1, n)
        index = next(c.index for c in NUCLEUS_CLASSES if c.name == cls)
        self.nuclei.append(np.column_stack([xy, r * (1 + e), r * (1 - e), np.full(n, index)]))

    def ring_nuclei(
        self,
        centre: tuple[float, float],
        theta: np.ndarray,
        outer: np.ndarray,
        inner: np.ndarray,
        spacing_um: float,
        radius_um: float,
        cls: str,
        depth: tuple[float, float],
    ) -> None:
        """Nuclei along a gland's epithelial ring, ``depth`` of the way from lumen to basement."""
        cx, cy = centre
        n = max(5, int(2 * np.pi * outer.mean() / (spacing_um * self.um)))
        a = np.linspace(0, 2 * np.pi, n, endpoint=False) + self.rng.uniform(-0.3, 0.3, n) * 2 * np.pi / n
        ro = np.interp(a, theta, outer, period=2 * np.pi)
        ri = np.interp(a, theta, inner, period=2 * np.pi)
        r = ri + (ro - ri) * self.rng.uniform(*depth, n)
        self.add_nuclei(np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], axis=1), radius_um, cls)


def _benign(scene: _Scene, region: np.ndarray, size: float) -> None:
    """Large glands: a ring of pale epithelium with papillary infoldings around a white lumen."""
    rng, um = scene.rng, scene.um
    rmax = min(55 * um, 0.35 * size)
    theta, centres, radii = _pack(rng, region, (0.5 * rmax, rmax), 8 * um, fill=0.55, amp=0.06, vertices=96)
    for (cx, cy), outer in zip(centres, radii, strict=True):
        fold = (0.5 + 0.5 * np.cos(rng.integers(4, 8) * theta + rng.uniform(0, 2 * np.pi))) ** 3
        inner = np.maximum(outer - rng.uniform(10, 16) * um * (1 + 1.2 * fold), 0.25 * outer)
        scene.shape(materials.EPI_BENIGN, _ring(cx, cy, theta, outer), structure=True)
        scene.shape(materials.LUMEN, _ring(cx, cy, theta, inner))
        scene.ring_nuclei((cx, cy), theta, outer, inner, 9.0, 3.4, "Epithelial", (0.45, 0.75))


def _g3(scene: _Scene, region: np.ndarray, size: float) -> None:
    """Small, separate, well-formed glands: a thin ring of tumour cells around a small lumen."""
    rng, um = scene.rng, scene.um
    rmax = min(30 * um, 0.3 * size)
    theta, centres, radii = _pack(rng, region, (0.5 * rmax, rmax), 10 * um, fill=0.45, amp=0.05, vertices=32)
    for (cx, cy), outer in zip(centres, radii, strict=True):
        inner = np.maximum(outer - rng.uniform(7, 10) * um, 0.3 * outer)
        scene.shape(materials.EPI_TUMOR, _ring(cx, cy, theta, outer), structure=True)
        scene.shape(materials.LUMEN, _ring(cx, cy, theta, inner))
        scene.ring_nuclei((cx, cy), theta, outer, inner, 8.5, 3.9, "Tumor", (0.35, 0.65))


def _g4(scene: _Scene, region: np.ndarray, size: float) -> None:
    """Cribriform masses: fused epithelium punched by many small round lumens."""
    rng, um = scene.rng, scene.um
    rmax = min(90 * um, 0.35 * size)
    theta, centres, radii = _pack(rng, region, (0.4 * rmax, rmax), 12 * um, fill=0.6, amp=0.12, vertices=48)
    for (cx, cy), outer in zip(centres, radii, strict=True):
        mass = _ring(cx, cy, theta, outer)
        scene.shape(materials.EPI_TUMOR, mass, structure=True)
        circle, holes, hole_r = _pack(rng, mass, (3.5 * um, 9 * um), 7 * um, fill=0.3, amp=0.0, vertices=16)
        for (lx, ly), lr in zip(holes, hole_r, strict=True):
            scene.shape(materials.LUMEN, _ring(lx, ly, circle, lr))
        pts = _hex_points(rng, mass, 9.5 * um, 1.5 * um)
        if len(holes):
            gap = np.hypot(pts[:, None, 0] - holes[None, :, 0], pts[:, None, 1] - holes[None, :, 1])
            pts = pts[(gap - hole_r[None, :, 0]).min(axis=1) > 3 * um]
        scene.add_nuclei(pts, 3.9, "Tumor")


def _g5(scene: _Scene, region: np.ndarray, size: float) -> None:
    """Solid sheets: the whole region is dark cytoplasm packed with tumour nuclei, no lumens."""
    rng, um = scene.rng, scene.um
    scene.shape(materials.SHEET, region, structure=True)
    pts = _hex_points(rng, region, 10 * um, 1.2 * um)
    scene.add_nuclei(pts[rng.uniform(size=len(pts)) > 0.04], 4.1, "Tumor", elongation=0.15)


_PATTERN_DRAWERS = {"Benign": _benign, "G3": _g3, "G4": _g4, "G5": _g5}


def _tissue(rng: np.random.Generator, width: int, height: int) -> list[np.ndarray]:
    """One or two irregular tissue blobs, scaled so they stay inside the slide."""
    s = min(width, height)
    if rng.uniform() < 0.6:
        centres, target = [(width / 2, height / 2) + rng.uniform(-0.04, 0.04, 2) * s], 0.42 * s
    else:
        along = np.array([1.0, 0.0]) if width >= height else np.array([0.0, 1.0])
        mid, span = np.array([width / 2, height / 2]), 0.24 * max(width, height)
        centres = [mid + sign * span * along + rng.uniform(-0.03, 0.03, 2) * s for sign in (-1, 1)]
        target = min(0.27 * s, 0.26 * max(width, height))
    blobs = []
    for cx, cy in centres:
        theta, (rho,) = _radial(rng, 128, 0.07)
        reach = np.minimum(_reach(np.cos(theta), cx, width), _reach(np.sin(theta), cy, height))
        r0 = min(target, float((reach / rho).min()))
        blobs.append(_ring(cx, cy, theta, r0 * rho))
    return blobs


def _reach(direction: np.ndarray, start: float, extent: float) -> np.ndarray:
    """How far a ray from ``start`` may go along ``direction`` and stay within 2-98% of ``extent``."""
    out = np.full(direction.shape, np.inf)
    pos, neg = direction > 1e-9, direction < -1e-9
    out[pos] = (0.98 * extent - start) / direction[pos]
    out[neg] = (0.02 * extent - start) / direction[neg]
    return out


def _plan(rng: np.random.Generator, primary: str) -> list[tuple[str, float]]:
    """Classes and radii (fraction of the slide's short side); the primary pattern is the largest."""
    if primary == "Benign":
        return [("Benign", 0.22)] + ([("Benign", 0.13)] if rng.uniform() < 0.5 else [])
    plan = [(primary, 0.22), ("Benign", 0.14)]
    if rng.uniform() < 0.5:
        plan.append((str(rng.choice([p for p in _TUMOUR if p != primary])), 0.11))
    return plan


def _regions(
    rng: np.random.Generator, plan: list[tuple[str, float]], tissue: list[np.ndarray], s: float, um: float
) -> list[ClassRegion]:
    """Place non-overlapping class regions inside the tissue, shrinking any that will not fit."""
    placed: list[tuple[ClassRegion, np.ndarray, float]] = []
    for name, frac in plan:
        radius = frac * s
        for attempt in range(300):
            if attempt and attempt % 30 == 0:
                radius *= 0.85
            blob = tissue[int(rng.integers(len(tissue)))]
            candidates = rng.uniform(blob.min(0), blob.max(0), (32, 2))
            inside = candidates[points_in_ring(candidates, blob)]
            if not len(inside):
                continue
            centre = inside[0]
            theta, (rho,) = _radial(rng, 96, 0.08)
            poly = _ring(*centre, theta, radius * rho)
            bound = radius * rho.max()
            if not points_in_ring(_ring(*centre, theta, radius * rho + 20 * um), blob).all():
                continue
            if any(np.hypot(*(centre - c)) < bound + b + 30 * um for _, c, b in placed):
                continue
            placed.append((ClassRegion(name, poly), centre, bound))
            break
    return [p[0] for p in placed]


def generate_geometry(seed: int, width: int, height: int, mpp: float = 0.25) -> SlideGeometry:
    """The vector scene of slide ``seed``: tissue, class regions with their patterns, nuclei.

    Sizes of glands and nuclei are physical (µm, via ``mpp``); tissue and regions scale with the
    slide, so a small test slide still holds every pattern.
    """
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x5717])
    um, s = 1.0 / mpp, float(min(width, height))
    tissue = _tissue(rng, width, height)
    regions = _regions(rng, _plan(rng, PATTERNS[seed % 4]), tissue, s, um)
    scene = _Scene(rng, um)
    for blob in tissue:
        scene.shape(materials.STROMA, blob)
    for region in regions:
        _PATTERN_DRAWERS[region.class_name](
            scene, region.polygon, math.sqrt(ring_area(region.polygon) / np.pi)
        )
    _stroma_nuclei(scene, tissue, width, height, mpp)

    nuclei = np.concatenate(scene.nuclei) if scene.nuclei else np.zeros((0, 5))
    nuclei = nuclei[np.argsort(nuclei[:, 1], kind="stable")]
    polygons = tuple(np.round(p, 2) for p in scene.polygons)
    areas = {name: sum(ring_area(r.polygon) for r in regions if r.class_name == name) for name in _TUMOUR}
    label = max(_TUMOUR, key=lambda n: areas[n]) if any(areas.values()) else "Benign"
    return SlideGeometry(
        seed=seed,
        width=width,
        height=height,
        mpp=mpp,
        label=label,
        tissue=tuple(np.round(t, 2) for t in tissue),
        regions=tuple(ClassRegion(r.class_name, np.round(r.polygon, 2)) for r in regions),
        shape_codes=np.array(scene.codes, np.uint8),
        shape_polygons=polygons,
        shape_bounds=np.array([[*p.min(0), *p.max(0)] for p in polygons]).reshape(-1, 4),
        nuclei_xy=np.round(nuclei[:, :2], 2),
        nuclei_radius=nuclei[:, 2:4].astype(np.float32),
        nuclei_class=nuclei[:, 4].astype(np.uint8),
        stain=rng.uniform(-8, 8, (2, 3)),
    )


def _stroma_nuclei(scene: _Scene, tissue: list[np.ndarray], width: int, height: int, mpp: float) -> None:
    """Sparse elongated nuclei in the tissue, kept off glands and sheets via a 4 µm/px mask."""
    from scipy.ndimage import binary_dilation  # scipy.ndimage takes ~0.4 s to import: only when needed

    rng, cell = scene.rng, 4.0 / mpp
    mask = Image.new("1", (math.ceil(width / cell) + 1, math.ceil(height / cell) + 1), 0)
    draw = ImageDraw.Draw(mask)
    for poly in scene.structures:
        draw.polygon((poly / cell).ravel().tolist(), fill=1)
    blocked = binary_dilation(np.array(mask), iterations=1)
    points = []
    for blob in tissue:
        n = int(_STROMA_NUCLEI_PER_MM2 * ring_area(blob) * mpp * mpp / 1e6)
        box = np.prod(blob.max(0) - blob.min(0))
        candidates = rng.uniform(blob.min(0), blob.max(0), (int(n * box / max(ring_area(blob), 1)) + 1, 2))
        candidates = candidates[points_in_ring(candidates, blob)]
        cells = (candidates / cell).astype(np.int64)
        points.append(candidates[~blocked[cells[:, 1], cells[:, 0]]])
    xy = np.concatenate(points)
    scene.add_nuclei(xy, 3.0, "Stromal", elongation=0.0)
    long = rng.uniform(size=len(xy)) < 0.5  # spindle-shaped, lying along x or y
    scene.nuclei[-1][:, 2:4] *= np.where(long[:, None], [1.5, 0.55], [0.55, 1.5])
