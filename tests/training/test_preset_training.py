"""A project on a foundation preset trains on Ray (LoRA, intermediate blocks), exports a plain package,
and that package analyses a slide."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_preset_trains_exports_a_plain_package_and_analyses_a_slide(
    ray_local, project, manifest_path, tmp_path
):
    import pandas as pd
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from pathray.cli import app
    from pathray.models.foundation import build_backbone
    from pathray.models.package import read_model_package
    from pathray.models.presets import get_preset
    from pathray.training.evaluate import load_trained
    from pathray.training.trainer import run_training

    # kaiko's ViT-S/16, two blocks deep, from a local checkpoint in its published (timm) layout
    torch.manual_seed(0)
    weights = tmp_path / "kaiko_vits16.pth"
    torch.save(
        build_backbone(get_preset("kaiko_vits16").replace(model_kwargs={"depth": 2})).state_dict(), weights
    )
    cfg = project(
        "preset-lora",
        "engine.name=foundation",
        "engine.preset=kaiko_vits16",
        "engine.model_kwargs={depth: 2}",
        f"engine.weights={weights}",
        "engine.finetune=lora",
        "engine.decoder_blocks=[0, 1]",
        "data.stream.sampler.size=64",
        "data.stream.sampler.mpps=[2.0]",
        "scale.workers=1",
        "train.steps=3",
        "run.checkpoint_every=3",
        "train.eval_split=null",
        config="gleason-foundation.yaml",
    )
    assert cfg.engine.img_size == 64 and cfg.optim.layer_decay == 0.75
    result = run_training(cfg)
    assert result.metrics["step"] == 3

    uri = result.paths["model"]
    package = read_model_package(uri)
    engine = package.config.engine
    assert (engine.preset, engine.finetune, engine.decoder_blocks) == ("kaiko_vits16", "full", [0, 1])
    assert package.config.meta["finetune"] == "lora" and package.config.meta["init_weights"] == str(weights)
    assert package.config.normalisation.mean == (0.5, 0.5, 0.5) and package.config.input.tile_size == 64
    state = load_file(str(Path(uri) / "weights.safetensors"))
    assert "engine.backbone.blocks.1.attn.qkv.weight" in state and not [k for k in state if "lora" in k]

    served, _ = package.build()
    trained, _ = load_trained(cfg.engine, cfg.task_spec(), result.checkpoint)
    assert any(".lora_" in name for name, _ in trained.named_parameters())
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(served(tiles), trained(tiles), rtol=1e-4, atol=1e-4)

    slide = pd.read_parquet(manifest_path)["uri"].iloc[-1]
    out = tmp_path / "analysis"
    analysed = CliRunner().invoke(app, ["analyze", str(slide), "--model", uri, "--out", str(out)])
    assert analysed.exit_code == 0, analysed.output
    summary = json.loads(analysed.stdout[: analysed.stdout.rindex("}") + 1])
    assert summary["tiles"] > 0 and summary["tiles_done"] == summary["tiles"], summary
