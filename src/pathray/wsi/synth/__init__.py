"""Synthetic H&E-like prostate slides with known Gleason regions and nuclei (pyramidal TIFF + GeoJSON)."""

from pathray.wsi.synth.render import render_region
from pathray.wsi.synth.scene import PATTERNS, ClassRegion, SlideGeometry, generate_geometry
from pathray.wsi.synth.slides import (
    SynthConfig,
    SyntheticSlide,
    write_synthetic_slide,
    write_synthetic_slides,
)

__all__ = [
    "PATTERNS",
    "ClassRegion",
    "SlideGeometry",
    "SynthConfig",
    "SyntheticSlide",
    "generate_geometry",
    "render_region",
    "write_synthetic_slide",
    "write_synthetic_slides",
]
