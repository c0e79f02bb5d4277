"""Training fixtures: six small synthetic slides (4 train, 2 test) and project configs over them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="session")
def manifest_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pathray.datasets.manifest import synthetic_manifest, write_manifest
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("train-slides")
    slides = write_synthetic_slides(out, n=6, seed=0, config=SynthConfig(size=3072))
    frame = synthetic_manifest(slides)
    frame["split"] = ["train", "train", "train", "train", "test", "test"]
    return write_manifest(frame, out / "manifest.parquet")


@pytest.fixture
def project(manifest_path: Path, tmp_path: Path) -> Callable[..., Any]:
    """``project(name, *overrides, config=...)``: a shipped config made small: debug engine, 2 CPU
    workers at 0.5 CPU each, runs under ``tmp_path/runs``."""
    from pathray.config import load_config

    def make(name: str, *overrides: str, config: str = "gleason-cnn.yaml") -> Any:
        base = [
            f"data.manifest={manifest_path}",
            "engine.name=debug_cnn",
            "engine.model=null",
            "scale.workers=2",
            "scale.cpus_per_worker=0.5",
            f"run.storage_path={tmp_path / 'runs'}",
            f"run.name={name}",
            "data.stream.sampler.tiles_per_slide=32",
            "data.stream.readers=1",
            "train.eval_tiles_per_slide=16",
            "train.batch_size=8",
        ]
        return load_config(CONFIGS / config, [*base, *overrides])

    return make
