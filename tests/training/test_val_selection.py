"""The val split chooses the checkpoint a run keeps, exports and tests; early stopping ends a run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def val_manifest(manifest_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The training slides with one of the four train slides moved to a val split."""
    from pathray.datasets.manifest import write_manifest

    frame = pd.read_parquet(manifest_path)
    frame["split"] = ["train", "train", "train", "val", "test", "test"]
    return write_manifest(frame, tmp_path_factory.mktemp("val-manifest") / "manifest.parquet")


def _history(result) -> list[dict]:
    return [json.loads(line) for line in Path(result.paths["history"]).read_text().splitlines()]


def test_the_best_val_checkpoint_is_kept_exported_and_tested_once(ray_local, project, val_manifest):
    from pathray.models.package import read_model_package
    from pathray.training.trainer import run_training

    cfg = project(
        "val-best",
        f"data.manifest={val_manifest}",
        "train.steps=8",
        "run.checkpoint_every=2",
        "run.log_every=2",
        "run.keep_checkpoints=1",
        "train.val_tiles_per_slide=12",
    )
    result = run_training(cfg)
    history = _history(result)
    scored = [(r["step"], r["val/score"]) for r in history if "val/score" in r]
    assert [step for step, _ in scored] == [2, 4, 6, 8]  # scored at every checkpoint, rank 0's on all
    assert all(r["val/macro_f1"] == r["val/score"] for r in history if "val/score" in r)
    best = max(score for _, score in scored)
    chosen = max(step for step, score in scored if score == best)  # ties: the later step
    m = result.metrics
    assert m["chosen_step"] == chosen and m["val/best_score"] == best
    assert read_model_package(result.paths["model"]).meta["step"] == chosen
    assert "state.json" in {p.name for p in Path(result.checkpoint).iterdir()}
    assert json.loads((Path(result.checkpoint) / "state.json").read_text())["step"] == chosen
    tested = [r for r in history if any(k.startswith("eval/") for k in r)]
    assert len(tested) == 1 and tested[0]["step"] == chosen  # the test split, once, by the kept weights
    assert m["test/slides"] == 2


def test_early_stopping_ends_a_run_whose_val_score_stops_improving(ray_local, project, val_manifest):
    from pathray.training.trainer import run_training

    # lr 0 on a BatchNorm-free ViT: the weights never change, so every val score equals the first
    # and, with patience 1, the second checkpoint stops the run.
    cfg = project(
        "val-early-stop",
        f"data.manifest={val_manifest}",
        "engine.name=debug_vit",
        "optim.lr=0",
        "train.steps=40",
        "run.checkpoint_every=2",
        "run.log_every=2",
        "train.early_stop_patience=1",
        "train.val_tiles_per_slide=8",
        "train.eval_mode=tiles",
        "scale.workers=1",
    )
    result = run_training(cfg)
    history = _history(result)
    scores = [r["val/score"] for r in history if "val/score" in r]
    assert len(scores) == 2 and scores[0] == scores[1]
    assert result.metrics["steps_trained"] == 4 and result.metrics["stopped_early"] == 1.0
    assert result.metrics["chosen_step"] == 4
    from pathray.training.progress import progress_line

    last = [r for r in history if "val/score" in r][-1]
    assert progress_line(last, 40).endswith(f"val {scores[1]:.3f}  (stopped early: no better val score)")


def test_without_val_slides_the_last_checkpoint_is_kept(ray_local, project):
    from pathray.training.trainer import val_tiles

    cfg = project("no-val")
    from pathray.datasets.manifest import load_manifest

    manifest = load_manifest(cfg.data.manifest)
    assert val_tiles(cfg, manifest, cfg.task_spec()) is None  # the shared manifest has no val split
    on_all = cfg.model_copy(update={"data": cfg.data.model_copy(update={"split": None})})
    assert val_tiles(on_all, manifest, cfg.task_spec()) is None  # val would be trained on
