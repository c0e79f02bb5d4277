"""A task registered here, in the test, runs through the config, the tile stream's preview and the
whole-slide predictor without any other module knowing it: everything task-specific is in its spec."""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pytest
from PIL import Image, ImageDraw
from pydantic import Field

from pathray.models.tasks import Output, TaskConfigBase, TaskSpec
from pathray.registry import TASKS

GLEASON = ["Background", "Benign", "G3", "G4", "G5"]


def tumour_task() -> tuple[type[TaskConfigBase], type[TaskSpec]]:
    """A tile task pathray does not ship: is most of the tile tumour (G3-G5)? Defined in a function,
    so Ray's reader processes receive the classes themselves, not a module to import."""

    class TumourTileConfig(TaskConfigBase):
        name: Literal["tumour_tile"] = "tumour_tile"
        classes: list[str] = Field(default_factory=lambda: ["Other", "Tumour"])
        share: float = 0.5

    class TumourTileTask(TaskSpec):
        config_type = TumourTileConfig
        output = Output(class_map=True)
        class_targets = True
        drawn: list[int] = []  # targets the preview drew (the preview runs in this process)

        def target(self, index: Any, x: int, y: int, extent: float, size: int, label: str = "") -> int:
            from pathray.wsi.annotations import segmentation_target

            mask = segmentation_target(index, x, y, extent, 16, GLEASON)
            return int((mask >= 2).mean() > self.config.share)

        def draw(self, image: Image.Image, target: Any, colour: Any) -> Image.Image:
            type(self).drawn.append(int(target))
            out = image.copy()
            ImageDraw.Draw(out).rectangle([0, 0, 7, 7], fill=colour(self.config.classes[int(target)], 1))
            return out

        def build_head(self, embed_dim: int, dense_channels: int) -> Any:
            from pathray.models.heads import LinearHead

            return LinearHead(embed_dim, len(self.config.classes))

        def class_probs(self, outputs: Any) -> Any:
            return outputs.float().softmax(1)[:, :, None, None]

    return TumourTileConfig, TumourTileTask


@pytest.fixture
def tumour_tile():
    config_type, spec_type = tumour_task()
    TASKS.add("tumour_tile", spec_type)
    try:
        yield config_type, spec_type
    finally:
        TASKS.remove("tumour_tile")


@pytest.fixture(scope="module")
def slides(tmp_path_factory):
    from pathray.datasets.manifest import synthetic_manifest, write_manifest
    from pathray.wsi.synth import SynthConfig, write_synthetic_slides

    out = tmp_path_factory.mktemp("new-task")
    written = write_synthetic_slides(out, n=2, seed=4, config=SynthConfig(size=3072))
    frame = synthetic_manifest(written)
    frame["split"] = "train"
    return write_manifest(frame, out / "manifest.parquet"), written


@pytest.mark.ray
def test_a_task_registered_in_a_test_runs_through_preview_and_the_predictor(
    ray_local, tumour_tile, slides, tmp_path
):
    from pathray.config import load_config
    from pathray.datasets.preview import preview
    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.predictor import Predictor
    from pathray.inference.spec import ModelSpec
    from pathray.models.task_model import build_model

    config_type, spec_type = tumour_tile
    manifest, written = slides
    cfg = load_config(
        None,
        [
            "engine.name=debug_cnn",
            "task.name=tumour_tile",
            "task.share=0.4",
            f"data.manifest={manifest}",
            "data.stream.sampler.kind=class_balanced",
            "data.stream.sampler.tiles_per_slide=12",
            "data.stream.readers=1",
        ],
    )
    assert isinstance(cfg.task, config_type) and cfg.task.share == 0.4  # its own config type
    task = cfg.task_spec()
    assert isinstance(task, spec_type)

    # the stream cuts the task's targets (in Ray's reader processes) and the preview draws them:
    # every tile of both slides (2 x 12), so which tiles come first does not matter
    result = preview(cfg.data, task, cfg.storage, cfg.tissue, 24, tmp_path / "sheet.png")
    assert result["tiles"] == 24 and result["faults"]["failed_slides"] == {}
    assert Image.open(tmp_path / "sheet.png").size[0] > 0
    assert sorted(set(spec_type.drawn)) == [0, 1]  # class-balanced tiles: tumour ones and others

    # the predictor stitches the task's per-tile probabilities into a class map of its classes
    model, _ = build_model(cfg.engine, cfg.task)
    sampler = cfg.data.stream.sampler
    spec = ModelSpec(task, sampler.size, sampler.mpps[0], name="tumour")
    inference = InferenceConfig(chunk_tiles=16, batch_size=16, out_mpp=8.0)
    analysis = analyze_slide(str(written[0].path), Predictor(model, spec, inference))
    assert analysis.task == "tumour_tile" and analysis.classes == ["Other", "Tumour"]
    assert set(analysis.areas_mm2) == {"Other", "Tumour"} and analysis.tiles_done == analysis.tiles > 0
    assert set(np.unique(analysis.class_map)) <= {0, 1, 255} and sum(analysis.areas_mm2.values()) > 0


def test_an_unregistered_task_name_is_an_error_that_lists_the_known_ones():
    from pathray.config import load_config
    from pathray.section import ConfigError

    with pytest.raises(ConfigError, match="unknown task 'tumour_tile'; known: classification"):
        load_config(None, ["task.name=tumour_tile"])
