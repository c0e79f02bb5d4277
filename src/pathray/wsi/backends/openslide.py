"""Formats only OpenSlide reads (DICOM, MRXS, VMS, ...), from a local path or a local cached copy."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np

from pathray.registry import SLIDE_BACKENDS
from pathray.storage import Location, StorageConfig, cache_root, filesystem, stat, translate_error
from pathray.wsi.backends.errors import SlideFormatError, SlideReadError
from pathray.wsi.backends.slide import FILL, Slide

# Formats whose slide is several files: copy these companions along with the named file.
MULTI_FILE_SUFFIXES = {
    ".mrxs": "folder",
    ".vms": "siblings",
    ".vmu": "siblings",
    ".dcm": "siblings",
    "": "siblings",
}


def default_cache_dir() -> Path:
    return cache_root() / "slides"


def local_copy(location: Location, storage: StorageConfig | None) -> str:
    """A local path for ``location``: itself when local, else a cached copy (with companions).

    The cache key includes the object's size and version tag, so a changed object is copied
    again. Multi-file formats (DICOM folders, MRXS + data folder) are copied whole.
    """
    if location.is_local:
        return location.path
    storage = storage or StorageConfig()
    info = stat(location, storage)
    key = hashlib.sha256(f"{location.uri}|{info['size']}|{info['tag']}".encode()).hexdigest()[:24]
    root = Path(storage.cache_dir).expanduser() if storage.cache_dir else default_cache_dir()
    target_dir = root / key
    target = target_dir / location.name
    if target.exists():
        return str(target)
    fs = filesystem(location, storage)
    parent = location.path.rsplit("/", 1)[0]
    suffix = Path(location.name).suffix.lower()
    mode = MULTI_FILE_SUFFIXES.get(suffix)
    tmp = target_dir.with_name(key + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if mode == "siblings":
            for entry in fs.ls(parent, detail=True):
                if entry.get("type") == "file":
                    fs.get_file(entry["name"], str(tmp / entry["name"].rsplit("/", 1)[-1]))
        else:
            fs.get_file(location.path, str(tmp / location.name))
            if mode == "folder":
                stem = location.path[: -len(suffix)]
                if fs.exists(stem):
                    fs.get(stem, str(tmp / Path(location.name).stem), recursive=True)
    except Exception as exc:  # noqa: BLE001
        shutil.rmtree(tmp, ignore_errors=True)
        raise translate_error(location.uri, exc) from None
    shutil.rmtree(target_dir, ignore_errors=True)
    tmp.rename(target_dir)
    return str(target)


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
