"""FSDP (torch FSDP2 ``fully_shard``) over 2 CPU workers (gloo) on real Ray: sharded training, a
killed worker resumed from a full checkpoint, evaluation and an exported plain model."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_fsdp_trains_sharded_resumes_and_exports_a_plain_model(ray_local, project, tmp_path):
    import torch

    from pathray.models.package import read_model_package
    from pathray.models.task_model import build_model
    from pathray.training.evaluate import load_trained
    from pathray.training.trainer import run_training

    name = f"fsdp-{tmp_path.name}"
    cfg = project(
        name,
        "engine.name=debug_vit",
        "scale.strategy=fsdp",
        "train.steps=6",
        "run.checkpoint_every=2",
        "run.log_every=2",
        "train.fail_at_step=3",
        "train.fail_rank=1",
        "run.max_failures=2",
        "train.weights_digest=true",
        config="gleason-foundation.yaml",
    )
    (Path(tempfile.gettempdir()) / f"pathray-failed-{name}").unlink(missing_ok=True)  # an earlier session's
    result = run_training(cfg)

    # each rank held half of the parameters, and the gathered weights agree on both ranks
    history = [json.loads(line) for line in Path(result.paths["history"]).read_text().splitlines()]
    train_rows = [row for row in history if "loss" in row]
    assert all(0.4 < row["params_local_share"] < 0.6 for row in train_rows), train_rows
    digests = tmp_path / "runs" / name / "digests"
    by_step = {s: {(digests / f"step{s}_rank{r}.txt").read_text() for r in (0, 1)} for s in (2, 4, 6)}
    assert all(len(d) == 1 for d in by_step.values()), by_step
    assert len({next(iter(d)) for d in by_step.values()}) == 3  # and they changed step by step

    # killed at step 3, resumed from the step-2 checkpoint (step 2 once), on to step 6
    marker = Path(tempfile.gettempdir()) / f"pathray-failed-{name}"
    assert marker.read_text() == "killed"
    assert [row["step"] for row in train_rows] == [2, 4, 6]

    # the checkpoint is a full, plain state dict (no pickled objects): it loads strictly into an
    # unwrapped model
    saved = torch.load(Path(result.checkpoint) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert saved["strategy"] == "fsdp" and saved["step"] == 6
    plain, _ = build_model(cfg.engine, cfg.task)
    plain.load_state_dict(saved["model"])
    assert all(type(t) is torch.Tensor for t in saved["model"].values())
    assert "state" in saved["optimizer"] and saved["optimizer"]["state"]

    # evaluation on the test split ran, and the exported package serves the same model
    assert result.metrics["test/tiles"] >= 16 and "test/macro_f1" in result.metrics
    served, _ = read_model_package(result.paths["model"]).build()
    trained, _ = load_trained(cfg.engine, cfg.task_spec(), result.checkpoint)
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(served(tiles), trained(tiles))


def test_dinov2_pretrains_with_fsdp_student_and_teacher_sharded(ray_local, project):
    """DINOv2 (iBOT masks, KoLeo, Sinkhorn-Knopp) with the student, its mask token and heads, and
    the teacher sharded over 2 gloo ranks; the live SSL scores gather the sharded teacher."""
    import json

    import torch

    from pathray.models.engines import build_engine
    from pathray.training.trainer import run_training

    cfg = project(
        "dinov2-fsdp",
        "engine.name=debug_vit",
        "engine.model=null",
        "engine.img_size=64",
        "scale.strategy=fsdp",
        "train.steps=2",
        "run.checkpoint_every=2",
        "data.stream.sampler.size=64",
        "data.stream.sampler.mpps=[1.0]",
        "data.stream.augment.global_size=64",
        "data.stream.augment.local_size=32",
        "data.stream.augment.local_crops=2",
        "task.out_dim=256",
        "task.head_hidden=64",
        "task.head_bottleneck=32",
        "train.eval_split=test",
        config="dinov2-pretrain.yaml",
    )
    result = run_training(cfg)
    m = result.metrics
    assert m["step"] == 2 and 0.4 < m["params_local_share"] < 0.6, m
    rows = [json.loads(line) for line in (Path(result.run_dir) / "history.jsonl").read_text().splitlines()]
    assert any("ssl/knn_acc" in r and "loss/ibot" in r for r in rows), rows
    # the gathered teacher was scored on the held-out tiles after training too
    assert m["test/tiles"] > 0 and m["test/rankme"] >= 1.0, m
    # the gathered teacher differs from the student (EMA) and its backbone loads into an engine
    saved = torch.load(Path(result.checkpoint) / "checkpoint.pt", map_location="cpu", weights_only=True)
    key = next(k for k in saved["model"] if k.startswith("engine.backbone.blocks."))
    assert not torch.equal(saved["model"][key], saved["teacher_model"][key])
    build_engine(cfg.engine).load_backbone_weights(str(Path(result.checkpoint) / "checkpoint.pt"))
