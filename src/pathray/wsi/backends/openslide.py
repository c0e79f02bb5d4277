"""Formats only OpenSlide reads (DICOM, MRXS, VMS, ...), from a local path or a local cached copy."""

from __future__ import annotations

import numpy as np

from pathray.registry import SLIDE_BACKENDS
from pathray.storage import Location, StorageConfig
from pathray.wsi.backends.copies import MULTI_FILE_SUFFIXES, default_cache_dir, local_copy
from pathray.wsi.backends.errors import SlideFormatError, SlideReadError
from pathray.wsi.backends.slide import FILL, Slide

__all__ = ["MULTI_FILE_SUFFIXES", "OpenSlideBackend", "default_cache_dir", "local_copy"]


@SLIDE_BACKENDS.register("openslide")
class OpenSlideBackend(Slide):
    """OpenSlide on a local file. OpenSlide handles are thread-safe; a read error leaves them broken."""

    backend = "openslide"

    def __init__(
        self,
        location: Location,
        storage: StorageConfig | None = None,
        mpp_override: float | None = None,
        tile_cache: int = 64,
    ) -> None:
        super().__init__(location, mpp_override, storage)
        import openslide

        path = local_copy(location, storage)
        try:
            self._os = openslide.OpenSlide(path)
            props = dict(self._os.properties)
            dims = tuple((int(w), int(h)) for w, h in self._os.level_dimensions)
            downsamples = tuple(float(d) for d in self._os.level_downsamples)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideFormatError(location.uri, "not a slide format OpenSlide supports") from None
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideFormatError(location.uri, f"OpenSlide cannot read it ({exc})") from None
        self._init_levels(dims, downsamples, props)

    @property
    def vendor(self) -> str | None:
        return self._props.get("openslide.vendor")

    def _raw_mpp(self) -> object:
        return self._props.get("openslide.mpp-x")

    def associated_images(self) -> list[str]:
        return sorted(self._os.associated_images)

    def _read_level(self, level: int, x: int, y: int, w: int, h: int) -> np.ndarray:
        import openslide

        ds = self._downsamples[level]
        try:
            img = self._os.read_region((round(x * ds), round(y * ds)), level, (w, h))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(self.uri, f"OpenSlide failed to read pixels ({exc})") from None
        rgba = np.asarray(img)
        rgb = np.array(rgba[..., :3])
        rgb[rgba[..., 3] == 0] = FILL
        return rgb

    def close(self) -> None:
        self._os.close()
