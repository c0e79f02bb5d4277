"""An analysis result and its files: overlay and mask PNGs, QuPath GeoJSON, summary JSON."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pathray.storage import StorageConfig, join_uri, write_bytes
from pathray.wsi.annotations.classes import class_color
from pathray.wsi.backends.slide import Slide

NO_DATA = 255
"""Class-map value of pixels that were not analysed (no tissue tile covers them)."""
OUTPUT_FILES = ("overlay.png", "mask.png", "annotations.geojson", "summary.json")
FAILED_COLOR = (255, 0, 255)
"""Overlay hatching over tiles that could not be decoded (a colour no class uses)."""


def class_areas_mm2(class_map: np.ndarray, classes: list[str], out_mpp: float) -> dict[str, float]:
    """Area of every class in mm²: its pixel count times (out_mpp / 1000)².

    Counted class by class (a few ms for a 2048² map, where ``bincount`` first widens every pixel
    to 64 bits).
    """
    px = (out_mpp / 1000.0) ** 2
    return {name: float(np.count_nonzero(class_map == i)) * px for i, name in enumerate(classes)}


@dataclass
class AnalysisResult:
    """One slide's analysis: class map at ``out_mpp`` (or detections), areas, Gleason, timings."""

    class_map: np.ndarray | None
    areas_mm2: dict[str, float]
    gleason: dict | None
    points: list | None
    counts: dict[str, int] | None
    slide: str = ""
    model: str = ""
    classes: list[str] = field(default_factory=list)
    point_classes: list[str] = field(default_factory=list)
    task: str = "segmentation"
    out_mpp: float = 4.0
    slide_mpp: float = 0.25
    tiles: int = 0
    tiles_done: int = 0
    min_region_um2: float = 2500.0
    timings: dict[str, float] = field(default_factory=dict)
    point_map: np.ndarray | None = None
    failed_tiles: list[list[int]] = field(default_factory=list)  # level-0 (x, y) of undecodable tiles
    failed_cause: str = ""
    tile_extent: int = 0  # level-0 px a tile covers

    def summary(self) -> dict[str, Any]:
        """JSON-able: slide, model, tiles (failed ones listed by level-0 corner), areas_mm2, gleason,
        counts, timings."""
        return {
            "slide": self.slide,
            "model": self.model,
            "task": self.task,
            "tiles": self.tiles,
            "tiles_done": self.tiles_done,
            "tiles_failed": len(self.failed_tiles),
            "failed_share": round(len(self.failed_tiles) / self.tiles, 6) if self.tiles else 0.0,
            "failed_tiles": {"extent": self.tile_extent, "xy": self.failed_tiles, "cause": self.failed_cause},
            "out_mpp": self.out_mpp,
            "slide_mpp": self.slide_mpp,
            "areas_mm2": {k: round(v, 6) for k, v in self.areas_mm2.items()},
            "gleason": self.gleason,
            "counts": self.counts,
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def geojson(self) -> dict[str, Any]:
        """QuPath FeatureCollection: class regions as annotations (Background left out: it is
        everything else), detections as points, each with its classification name and colour."""
        from pathray.inference.polygons import class_polygons

        features = []
        if self.class_map is not None:
            d = self.out_mpp / self.slide_mpp
            min_px = self.min_region_um2 / self.out_mpp**2
            for i, name in enumerate(self.classes):
                if name == "Background":
                    continue
                for rings in class_polygons(self.class_map, i, d, min_px):
                    features.append(
                        _feature({"type": "Polygon", "coordinates": rings}, name, i, "annotation")
                    )
        names = {n: i for i, n in enumerate(self.point_classes)}
        for p in self.points or []:
            geometry = {"type": "Point", "coordinates": [round(p["x"], 2), round(p["y"], 2)]}
            features.append(_feature(geometry, p["class"], names.get(p["class"], 0), "detection"))
        return {"type": "FeatureCollection", "features": features}

    def mask_image(self) -> np.ndarray:
        """uint8 class index per map pixel (255: not analysed); detections: their class at their pixel."""
        if self.class_map is not None:
            return self.class_map
        if self.point_map is not None:
            return self.point_map
        return np.full((1, 1), NO_DATA, np.uint8)

    def overlay_image(self, thumbnail: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
        """The thumbnail (white if None) with class colours blended in (Background not tinted)."""
        from PIL import Image

        base = self.class_map
        shape = self.mask_image().shape
        if thumbnail is None:
            thumbnail = np.full((*shape, 3), 255, np.uint8)
        elif thumbnail.shape[:2] != shape:
            thumbnail = np.asarray(
                Image.fromarray(thumbnail).resize((shape[1], shape[0]), Image.Resampling.BILINEAR)
            )
        out = thumbnail.astype(np.float32)
        if base is not None:
            for i, name in enumerate(self.classes):
                sel = base == i
                if name != "Background" and sel.any():
                    out[sel] = (1 - alpha) * out[sel] + alpha * np.asarray(class_color(name, i), np.float32)
        self._hatch_failed(out)
        if self.points:  # detections, or instance centroids over the foreground tint
            d = self.out_mpp / self.slide_mpp
            for p in self.points:
                r, c = int(p["y"] / d), int(p["x"] / d)
                if 0 <= r < shape[0] and 0 <= c < shape[1]:
                    k = self.point_classes.index(p["class"]) if p["class"] in self.point_classes else 0
                    out[max(r - 1, 0) : r + 2, max(c - 1, 0) : c + 2] = class_color(p["class"], k)
        return out.clip(0, 255).astype(np.uint8)

    def _hatch_failed(self, out: np.ndarray, period: int = 4) -> None:
        """Diagonal ``FAILED_COLOR`` stripes over every tile that could not be decoded."""
        if not self.failed_tiles:
            return
        d = self.out_mpp / self.slide_mpp
        rows, cols = out.shape[:2]
        stripes = (np.add.outer(np.arange(rows), np.arange(cols)) % period) == 0
        for x, y in self.failed_tiles:
            r0, c0 = max(0, int(y / d)), max(0, int(x / d))
            r1 = min(rows, int(np.ceil((y + self.tile_extent) / d)))
            c1 = min(cols, int(np.ceil((x + self.tile_extent) / d)))
            out[r0:r1, c0:c1][stripes[r0:r1, c0:c1]] = FAILED_COLOR


def _thumbnail(slide: Slide, mpp: float) -> np.ndarray | None:
    """The overlay's background, or None (white) when its pixels cannot be decoded; storage that is
    down still fails (``SlideUnavailableError``)."""
    from pathray.storage import StorageUnavailableError
    from pathray.wsi.backends.errors import SlideError

    try:
        return slide.thumbnail(mpp=mpp)
    except StorageUnavailableError:
        raise
    except SlideError:
        return None


def _feature(geometry: dict[str, Any], name: str, i: int, object_type: str) -> dict[str, Any]:
    return {
        "type": "Feature",
        "geometry": geometry,
        "properties": {
            "objectType": object_type,
            "classification": {"name": name, "color": list(class_color(name, i))},
        },
    }


def _png(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def write_outputs(
    result: AnalysisResult, dest_uri: str, slide: Slide | None, storage: StorageConfig | None = None
) -> dict[str, str]:
    """Write ``OUTPUT_FILES`` under ``dest_uri`` (a folder or a bucket prefix); returns name -> URI.

    The overlay's thumbnail is read from ``slide`` at ``out_mpp`` (white when ``slide`` is None).
    """
    thumb = None
    if slide is not None and slide.mpp is not None:
        thumb = _thumbnail(slide, max(result.out_mpp, slide.mpp))
    mask = result.mask_image()
    blobs = {
        "overlay.png": _png(result.overlay_image(thumb)),
        "mask.png": _png(mask),
        "annotations.geojson": json.dumps(result.geojson(), separators=(",", ":")).encode(),
        "summary.json": json.dumps(result.summary(), indent=2).encode(),
    }
    return {name: write_bytes(join_uri(dest_uri, name), data, storage) for name, data in blobs.items()}
