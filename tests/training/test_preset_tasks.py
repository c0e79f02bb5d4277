"""Every supervised task trains on a foundation preset: detection, instance segmentation and tile
classification each train on Ray with kaiko's ViT-S/16 (two blocks, 64 px tiles), export a package
that records the preset, and that package analyses a slide with the task's own outputs.
(Segmentation on a preset: test_preset_training.py.)"""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TASKS = {
    # task -> (shipped config, overrides): the detection project as shipped; instances of its nuclei;
    # the Gleason project's regions as one class per tile
    "detection": ("nuclei-detection.yaml", []),
    "instance": ("nuclei-detection.yaml", ["task={name: instance, source: detections}"]),
    "classification": ("gleason-foundation.yaml", ["task.name=classification"]),
}


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_trains_on_a_preset_and_its_package_analyses_a_slide(
    ray_local, project, manifest_path, task
):
    import pandas as pd

    from pathray.inference.analyze import analyze_slide
    from pathray.inference.config import InferenceConfig
    from pathray.inference.predictor import Predictor
    from pathray.models.package import read_model_package
    from pathray.training.trainer import run_training

    config, overrides = TASKS[task]
    cfg = project(
        f"preset-{task}",
        "engine.name=foundation",
        "engine.preset=kaiko_vits16",
        "engine.model_kwargs={depth: 2}",
        "data.stream.sampler.size=64",
        "data.stream.sampler.mpps=[2.0]",
        "data.stream.sampler.tiles_per_slide=8",
        "scale.workers=1",
        "train.batch_size=4",
        "train.steps=2",
        "run.checkpoint_every=2",
        "train.eval_split=null",
        *overrides,
        config=config,
    )
    assert cfg.task.name == task and cfg.engine.img_size == 64
    result = run_training(cfg)
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["loss"])

    # the package records the preset (and its overrides): a predictor rebuilds the architecture from it
    uri = result.paths["model"]
    package = read_model_package(uri)
    engine = package.config.engine
    assert (engine.name, engine.preset, engine.model_kwargs) == ("foundation", "kaiko_vits16", {"depth": 2})
    assert package.config.task.name == task and package.config.input.tile_size == 64
    assert package.config.normalisation.mean == (0.5, 0.5, 0.5)  # kaiko's, not timm's ImageNet default
    assert "engine.backbone.blocks.1.attn.qkv.weight" in package.state
    assert "engine.backbone.blocks.2.attn.qkv.weight" not in package.state

    # the package analyses a held-out slide, Ray-free, with the task's outputs
    slide = pd.read_parquet(manifest_path)["uri"].iloc[-1]
    inference = InferenceConfig(batch_size=16, chunk_tiles=64, read_threads=2)
    predictor = Predictor.from_package(uri, config=inference)
    assert predictor.model.engine.preset.name == "kaiko_vits16"
    out = analyze_slide(slide, predictor)
    assert out.task == task and out.tiles > 0 and out.tiles_done == out.tiles
    spec = cfg.task_spec()
    names = spec.point_classes if spec.output.points else []
    assert names == {"detection": spec.classes, "instance": ["Instance"], "classification": []}[task]
    if names:  # points (detections, instance centroids) with a class each, counted per class
        assert out.point_classes == names and set(out.counts) == set(names)
        assert sum(out.counts.values()) == len(out.points)
        assert all(p["class"] in names and 0 <= p["score"] <= 1 for p in out.points)
    else:
        assert out.points is None and out.counts is None
    if task == "detection":  # the points are the map
        assert out.class_map is None and out.point_map is not None
    else:  # instances: a foreground map; classification: one Gleason class per tile
        classes = ["Background", "Foreground"] if task == "instance" else spec.classes
        assert out.classes == classes and out.class_map is not None
        assert set(np.unique(out.class_map)) <= {*range(len(classes)), 255}
        assert (out.class_map != 255).any()
