"""The Ray-free core (wsi, models, inference) imports no ray, and nothing does work at import."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import pathray

CORE = ("pathray.wsi", "pathray.models", "pathray.inference")


def core_modules() -> list[str]:
    names = []
    for info in pkgutil.walk_packages(pathray.__path__, "pathray."):
        if info.name.startswith(CORE):
            names.append(info.name)
    return names


def test_core_modules_exist():
    names = core_modules()
    assert "pathray.wsi.backends.open" in names and "pathray.wsi.patching.tissue" in names


def test_core_never_imports_ray():
    code = (
        "import sys, importlib\n"
        f"for name in {core_modules()!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the Ray-free core imported: {out.stdout}"


def test_cli_import_is_cheap():
    code = "import sys, pathray.cli; print(any(m in sys.modules for m in ('ray', 'torch', 'timm')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
