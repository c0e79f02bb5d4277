"""Engines, task heads, losses, metrics, DINO and public foundation models (no Ray).

``load_foundation`` is imported on first use, so ``import pathray.models`` stays free of torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_foundation"]


def __getattr__(name: str) -> Any:
    if name == "load_foundation":
        from pathray.models.foundation import load_foundation

        return load_foundation
    raise AttributeError(f"module 'pathray.models' has no attribute {name!r}")
