"""Synthetic slides: both readers see an SVS pyramid, bytes are reproducible, truth matches pixels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tiffslide
from pydantic import ValidationError
from scipy.ndimage import binary_erosion

from pathray.wsi.annotations.geojson import read_geojson
from pathray.wsi.annotations.geometry import points_in_ring
from pathray.wsi.synth import (
    PATTERNS,
    SynthConfig,
    generate_geometry,
    write_synthetic_slide,
    write_synthetic_slides,
)
from pathray.wsi.synth.render import render_region

SIZE = 3000  # not a multiple of the tile: edge tiles are exercised too
G5_SEED = 3  # PATTERNS[3 % 4] == "G5"; tumour slides always carry a Benign region as well


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("synth") / "g5.svs"
    return write_synthetic_slide(path, G5_SEED, SynthConfig(size=SIZE))


def test_openslide_and_tiffslide_read_the_same_pyramid(slide):
    with openslide.OpenSlide(str(slide.path)) as osl, tiffslide.TiffSlide(slide.path) as tsl:
        assert osl.level_count == tsl.level_count >= 3
        assert osl.level_dimensions == tsl.level_dimensions
        assert osl.level_dimensions[0] == (SIZE, SIZE)
        assert osl.level_downsamples == pytest.approx([2.0**i for i in range(osl.level_count)])
        assert tsl.level_downsamples == pytest.approx([2.0**i for i in range(tsl.level_count)])
        assert osl.properties["openslide.vendor"] == "aperio"
        assert tsl.properties["tiffslide.vendor"] == "aperio"
        assert float(osl.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        assert float(tsl.properties["tiffslide.mpp-x"]) == pytest.approx(0.25)
        assert "thumbnail" in osl.associated_images
        for level, at in ((0, (1200, 1300)), (1, (2000, 600))):
            a = np.asarray(osl.read_region(at, level, (300, 300)).convert("RGB"), np.float32)
            b = np.asarray(tsl.read_region(at, level, (300, 300)).convert("RGB"), np.float32)
            assert np.abs(a - b).mean() < 2.0


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path):
    config = SynthConfig(size=1024)
    a = write_synthetic_slide(tmp_path / "a.svs", 5, config)
    b = write_synthetic_slide(tmp_path / "b.svs", 5, config)
    c = write_synthetic_slide(tmp_path / "c.svs", 6, config)
    assert a.path.read_bytes() == b.path.read_bytes()
    assert a.annotations_path.read_bytes() == b.annotations_path.read_bytes()
    assert a.path.read_bytes() != c.path.read_bytes()
    assert a.annotations_path.read_bytes() != c.annotations_path.read_bytes()


def _inside(slide, polygon: np.ndarray, level: int, margin: int = 4) -> np.ndarray:
    """RGB pixels of ``level`` strictly inside ``polygon`` (eroded by ``margin`` px)."""
    d = 2**level
    (x0, y0), (x1, y1) = polygon.min(0).astype(int), polygon.max(0).astype(int)
    w, h = (x1 - x0) // d + 1, (y1 - y0) // d + 1
    with tiffslide.TiffSlide(slide.path) as tsl:
        rgb = np.asarray(tsl.read_region((int(x0), int(y0)), level, (w, h)).convert("RGB"))
    yy, xx = np.mgrid[0:h, 0:w]
    centres = np.stack([x0 + (xx.ravel() + 0.5) * d, y0 + (yy.ravel() + 0.5) * d], axis=1)
    mask = binary_erosion(points_in_ring(centres, polygon).reshape(h, w), iterations=margin)
    return rgb[mask]


def test_g5_regions_look_darker_and_benign_has_lumens(slide):
    regions = [a for a in read_geojson(slide.annotations_path) if a.geometry["type"] == "Polygon"]
    by_class = {
        name: np.concatenate(
            [
                _inside(slide, np.array(a.geometry["coordinates"][0]), 1)
                for a in regions
                if a.class_name == name
            ]
        )
        for name in ("G5", "Benign")
    }
    g5, benign = by_class["G5"].astype(float), by_class["Benign"].astype(float)
    assert g5.mean() < benign.mean() - 30
    white = {name: (px.min(axis=1) > 215).mean() for name, px in by_class.items()}
    assert white["Benign"] > 0.05 > white["G5"]
    assert g5[:, 2].mean() > g5[:, 1].mean() + 20  # purple: blue above green


def test_background_is_near_white(slide):
    with tiffslide.TiffSlide(slide.path) as tsl:
        corner = np.asarray(tsl.read_region((0, 0), 0, (40, 40)).convert("RGB"), np.float32)
    assert corner.mean() > 230 and corner.std() < 6


def test_nuclei_points_land_on_dark_pixels(slide):
    points = [a for a in read_geojson(slide.annotations_path) if a.geometry["type"] == "MultiPoint"]
    assert {a.class_name for a in points} >= {"Stromal", "Epithelial", "Tumor"}
    rng = np.random.default_rng(0)
    with tiffslide.TiffSlide(slide.path) as tsl:
        for ann in points:
            coords = np.array(ann.geometry["coordinates"])
            for x, y in coords[rng.choice(len(coords), size=min(15, len(coords)), replace=False)]:
                patch = np.asarray(tsl.read_region((int(x) - 1, int(y) - 1), 0, (3, 3)).convert("RGB"), float)
                assert patch.mean() < 150, (ann.class_name, x, y, patch.mean())


def test_labels_cycle_and_regions_do_not_overlap():
    labels = []
    for seed in range(8):
        g = generate_geometry(seed, 2048, 2048)
        names = {r.class_name for r in g.regions}
        assert 1 <= len(names) <= 3
        assert g.label == PATTERNS[seed % 4]
        for i, a in enumerate(g.regions):
            for b in g.regions[i + 1 :]:
                assert not points_in_ring(a.polygon, b.polygon).any()
        labels.append(g.label)
    assert set(labels) == set(PATTERNS)


def test_render_region_is_window_independent():
    g = generate_geometry(2, 2048, 2048)
    whole = render_region(g, 512, 512, 600, 500, 2.0)
    part = render_region(g, 512 + 2 * 100, 512 + 2 * 300, 300, 150, 2.0)
    np.testing.assert_array_equal(part, whole[300:450, 100:400])


def test_write_synthetic_slides_names_and_labels(tmp_path: Path):
    slides = write_synthetic_slides(tmp_path, n=4, seed=1, config=SynthConfig(size=512))
    assert [s.path.name for s in slides] == [f"slide_{i:03d}.svs" for i in range(4)]
    assert all(s.annotations_path.exists() and s.annotations_path.suffix == ".geojson" for s in slides)
    assert [s.label for s in slides] == list(PATTERNS)
    assert slides[0].slide_id == "slide_000" and slides[0].mpp == 0.25


def test_config_rejects_unknown_keys():
    with pytest.raises(ValidationError):
        SynthConfig(sise=1024)
