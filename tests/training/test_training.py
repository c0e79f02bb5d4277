"""Ray Train on a real local Ray with 2 CPU workers (gloo): DDP agreement, fault recovery, learning."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from pathray.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_a_killed_worker_resumes_from_its_checkpoint_and_ddp_ranks_agree(ray_local, project, tmp_path):
    from pathray.training.trainer import run_training

    name = f"fault-{tmp_path.name}"
    cfg = project(
        name,
        "train.steps=12",
        "run.checkpoint_every=5",
        "run.log_every=5",
        "train.fail_at_step=7",
        "train.fail_rank=1",
        "run.max_failures=2",
        "train.eval_split=null",
        "train.weights_digest=true",
    )
    marker = Path(__import__("tempfile").gettempdir()) / f"pathray-failed-{name}"
    marker.unlink(missing_ok=True)  # a marker left by an earlier session would spare the worker
    result = run_training(cfg)
    assert marker.read_text() == "killed", "the worker process was really killed once"
    history = [json.loads(line) for line in Path(result.paths["history"]).read_text().splitlines()]
    steps = [row["step"] for row in history]
    # resumed from the step-5 checkpoint: step 5 appears once, then the run goes on to 12
    assert steps == [5, 10, 12], steps
    assert result.metrics["step"] == 12
    # Both DDP ranks hold identical weights at every report, before the kill and after the resume,
    # and they did train in between.
    digests = Path(result.run_dir) / "digests"
    by_step = {s: {(digests / f"step{s}_rank{r}.txt").read_text() for r in (0, 1)} for s in steps}
    assert all(len(ranks) == 1 for ranks in by_step.values()), by_step
    assert len({ranks.pop() for ranks in by_step.values()}) == len(steps), by_step


def test_a_run_that_dies_keeps_its_history_and_showed_it_live(ray_local, project, tmp_path):
    """history.jsonl is rewritten at every report, so the reports before a crash survive it, and
    ``progress`` (what ``pathray train`` prints) saw each of them once, while the run went on."""
    import ray.train

    from pathray.training.progress import progress_line
    from pathray.training.trainer import run_training

    name = f"dies-{tmp_path.name}"
    cfg = project(
        name,
        "scale.workers=1",
        "train.steps=9",
        "run.log_every=2",
        "run.checkpoint_every=100",
        "train.fail_at_step=5",
        "train.fail_rank=0",
        "run.max_failures=0",
        "train.eval_split=null",
    )
    (Path(__import__("tempfile").gettempdir()) / f"pathray-failed-{name}").unlink(missing_ok=True)
    seen: list[dict] = []
    with pytest.raises(ray.train.TrainingFailedError):
        run_training(cfg, progress=seen.append)
    path = Path(cfg.run.storage_path) / name / "history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert [r["step"] for r in seen] == [2, 4]
    line = progress_line(seen[-1], 9)
    assert line.startswith("step 4/9  loss ") and " lr " in line and "tiles/s" in line and "ETA" in line
    assert all(r["tiles_per_s"] > 0 and r["eta_s"] > 0 and 0 <= r["data_wait_share"] <= 1 for r in rows)


def test_a_tiny_segmentation_run_learns(ray_local, project, tmp_path):
    from pathray.training.trainer import run_training

    # 100 steps: at 60 the held-out macro F1 ranged 0.18-0.30 over runs (stream order varies), too near
    # the margin; at 100 it was 0.31-0.37.
    cfg = project("learns", "train.steps=100", "run.checkpoint_every=50", "run.log_every=10")
    result = run_training(cfg)
    m = result.metrics
    assert m["test/tiles"] >= 16 and m["test/slides"] == 2
    assert m["test/coverage"] == 1.0  # every annotated pixel of both test slides was predicted
    assert m["test/macro_f1_lo"] <= m["test/macro_f1"] <= m["test/macro_f1_hi"]
    assert m["test/macro_f1"] > m["baseline/macro_f1"] + 0.15, m
    assert m["test/dice"] > m["baseline/dice"] + 0.3, m
    run_dir = Path(result.run_dir)
    for name in ("config.yaml", "metrics.json", "history.jsonl", "curves.png"):
        assert (run_dir / name).stat().st_size > 0
    assert load_config(run_dir / "config.yaml").run.name == "learns"  # the resolved config reloads
    # The exported model package rebuilds the trained model: same weights, same outputs.
    import torch

    from pathray.models.package import read_model_package
    from pathray.training.evaluate import load_trained

    package = read_model_package(result.paths["model"])
    served, _ = package.build()
    trained, _ = load_trained(cfg.engine, cfg.task_spec(), result.checkpoint)
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(served(tiles), trained(tiles))
    assert package.meta["step"] == 100 and package.config.task.classes == cfg.task.classes


# The two Gleason configs train elsewhere, so each costs the suite one run, not two:
# gleason-cnn.yaml (with debug_cnn) in ``test_a_tiny_segmentation_run_learns`` above, and
# gleason-foundation.yaml (with debug_vit) in test_experiment.py's fraction grid.
@pytest.mark.parametrize(
    ("config", "engine"),
    [
        ("dino-pretrain.yaml", "debug_vit"),
        ("nuclei-detection.yaml", "debug_cnn"),
    ],
)
def test_the_other_project_configs_train_a_few_steps(ray_local, project, tmp_path, config, engine):
    from pathray.training.trainer import run_training

    extra = ["data.stream.augment.global_size=64", "data.stream.augment.local_size=32"]
    extra += ["data.stream.sampler.size=64", "task.out_dim=256"] if "dino" in config else []
    # the detection run takes the packed-tile feed (what GPU workers get): the worker's collate step
    # decodes, cuts and augments; the points follow the flips the reader drew
    extra += ["data.stream.decode=device"] if "detection" in config else []
    cfg = project(
        config.removesuffix(".yaml"),
        f"engine.name={engine}",
        "train.steps=3",
        "run.checkpoint_every=3",
        *extra,
        config=config,
    )
    result = run_training(cfg)
    assert result.metrics["step"] == 3
    assert Path(result.checkpoint).exists()
    m = result.metrics
    if cfg.task.name == "ssl":  # label-free scores and a linear probe on a fixed tile set
        assert m["test/rankme"] > 2.0 and m["test/odcorr"] < 0.9, m  # embeddings not collapsed
        assert m["test/probe_train_tiles"] > 0 and m["test/probe_test_tiles"] > 0, m
        assert math.isfinite(m["test/probe_accuracy"]), m
    else:  # the held-out slides' annotated nuclei were counted: recall is defined only then
        assert math.isfinite(m["test/recall"]) and math.isfinite(m["test/f1"]), m


def test_the_training_stream_is_built_as_quiet_as_the_driver_has_ray_data(ray_local, project, tmp_path):
    """Ray Train builds the stream in its controller, whose Ray Data context is Ray's default
    (progress bars on): the driver's console settings (ensure_ray: off) go with it, so no progress
    bar of Ray Data runs through `pathray train`'s own lines."""
    import ray
    from ray.data import DataContext

    from pathray.datasets.manifest import load_manifest
    from pathray.training.trainer import TrainDataset

    cfg = project("quiet")
    assert DataContext.get_current().enable_progress_bars is False  # ensure_ray's
    manifest = load_manifest(cfg.data.manifest)
    factory = TrainDataset(cfg, manifest, cfg.data.stream, cfg.task_spec(), str(tmp_path / "run"), 1)

    @ray.remote(num_cpus=0)
    def build_elsewhere(factory: TrainDataset) -> tuple[bool, bool]:
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = True  # a fresh process's default
        ds = factory()
        return DataContext.get_current().enable_progress_bars, ds.context.enable_progress_bars

    assert ray.get(build_elsewhere.remote(factory)) == (False, False)
