"""The one place that imports timm: fixes PyPI's CUDA torchvision on a CPU torch first.

PyPI's torchvision 0.28 is a CUDA build; with the CPU torch its ``_C.so`` does not load and
``import torchvision`` (so ``import timm``) fails with "operator torchvision::nms does not
exist". Defining the two operator schemas before the first import lets it import; the
compiled ops themselves stay unavailable, and pathray never calls them. Every process that
imports timm (driver, Ray Train workers, Serve replicas, pytest) goes through ``import_timm``.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import threading
from types import ModuleType
from typing import Any

_LOCK = threading.Lock()
_LIBRARY: Any = None  # the schema registration must stay alive for the process


def _torchvision_c_loads() -> bool:
    """Whether torchvision's compiled extension loads beside this torch."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return True  # no torchvision: nothing to fix
    folder = list(spec.submodule_search_locations)[0]
    libs = [f for f in os.listdir(folder) if f.startswith("_C") and f.endswith((".so", ".pyd"))]
    if not libs:
        return False
    try:
        torch.ops.load_library(os.path.join(folder, libs[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_ops() -> None:
    """Define ``torchvision::nms`` and ``torchvision::qnms`` when the compiled ops are missing."""
    global _LIBRARY
    with _LOCK:
        if _LIBRARY is not None or "torchvision" in sys.modules:
            return
        import torch

        if _torchvision_c_loads():
            _LIBRARY = False
            return
        try:
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor qdets, Tensor scores, float iou_threshold) -> Tensor")
        except RuntimeError:
            _LIBRARY = False  # already defined in this process
            return
        _LIBRARY = lib


def import_timm() -> ModuleType:
    """``import timm``, working on CPU-only installs with PyPI's torchvision."""
    ensure_torchvision_ops()
    import timm

    return timm
