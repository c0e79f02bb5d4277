"""One registry: duplicates and unknown names are errors that say what exists."""

from __future__ import annotations

import pytest

from pathray.registry import SLIDE_BACKENDS, Registry, RegistryError


def test_register_and_get():
    reg: Registry[object] = Registry("widget")

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A
    assert "a" in reg and reg.names() == ["a"] and len(reg) == 1


def test_duplicate_is_an_error():
    reg: Registry[int] = Registry("widget")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="widget 'a' is already registered"):
        reg.add("a", 2)


def test_unknown_lists_known():
    reg: Registry[int] = Registry("widget")
    reg.add("b", 1)
    reg.add("a", 2)
    with pytest.raises(RegistryError) as info:
        reg.get("c")
    assert str(info.value) == "unknown widget 'c'; known: a, b"


def test_slide_backends_are_registered():
    import pathray.wsi.backends.open  # noqa: F401
    import pathray.wsi.backends.openslide  # noqa: F401
    import pathray.wsi.backends.tiff  # noqa: F401
    import pathray.wsi.backends.tifffile_slide  # noqa: F401

    assert SLIDE_BACKENDS.names() == ["openslide", "tifffile", "tiffslide"]
