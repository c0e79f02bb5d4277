"""Slide backends: one ``Slide`` interface over tiffslide and OpenSlide, read by exact byte ranges.

slide = open_slide("s3://bucket/case-01.svs", storage)
tile = slide.read(x=12000, y=8000, size=224, mpp=0.5)
"""

from pathray.wsi.backends.errors import (
    SlideAccessError,
    SlideError,
    SlideFormatError,
    SlideLocationError,
    SlideNotFoundError,
    SlideReadError,
    SlideUnavailableError,
    as_slide_error,
)
from pathray.wsi.backends.levels import LevelChoice, plausible_mpp, select_level
from pathray.wsi.backends.open import open_slide
from pathray.wsi.backends.ranges import ByteCounter, RangeReader
from pathray.wsi.backends.slide import Slide

__all__ = [
    "ByteCounter",
    "LevelChoice",
    "RangeReader",
    "Slide",
    "SlideAccessError",
    "SlideError",
    "SlideFormatError",
    "SlideLocationError",
    "SlideNotFoundError",
    "SlideReadError",
    "SlideUnavailableError",
    "as_slide_error",
    "open_slide",
    "plausible_mpp",
    "select_level",
]
