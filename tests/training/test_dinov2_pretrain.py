"""DINOv2 pretraining on a real local Ray: live SSL metrics, losses in the history, an exported
teacher that embeds and fine-tunes, and a kNN probe that beats the same backbone at random init."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SMALL = [
    "engine.name=debug_vit",
    "engine.model=null",
    "engine.img_size=64",
    # no registers, no LayerScale: LayerScale's 1e-5 start makes a random ViT's class token the
    # same for every tile, so the random-init baseline of the kNN probe would be chance by design
    "engine.model_kwargs={}",
    "data.stream.sampler.size=64",
    "data.stream.sampler.mpps=[1.0]",
    "data.stream.augment.global_size=64",
    "data.stream.augment.local_size=32",
    "data.stream.augment.local_crops=2",
    "task.out_dim=512",
    "task.head_hidden=128",
    "task.head_bottleneck=64",
    "task.freeze_last_layer_steps=2",
    "task.ema_momentum=0.99",
    "optim.lr=5.0e-3",
    "optim.lr_batch_scaling=none",
    "optim.warmup_steps=3",
    "train.batch_size=32",
    "train.val_tiles_per_slide=48",
    "run.log_every=10",
]


@pytest.fixture(scope="module")
def dinov2_run(ray_local, manifest_path, tmp_path_factory):
    """One short DINOv2 run (80 steps of 32 tiles) of configs/dinov2-pretrain.yaml, made small."""
    from pathray.config import load_config
    from pathray.training.trainer import run_training

    runs = tmp_path_factory.mktemp("dinov2-runs")
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "dinov2-pretrain.yaml",
        [
            f"data.manifest={manifest_path}",
            "scale.workers=1",
            "scale.cpus_per_worker=1",
            "data.stream.readers=1",
            f"run.storage_path={runs}",
            "run.name=dinov2",
            *SMALL,
            "train.steps=80",
            "train.eval_every=40",
            "run.checkpoint_every=40",
        ],
    )
    return cfg, run_training(cfg)


def history(result) -> list[dict]:
    return [json.loads(line) for line in Path(result.run_dir, "history.jsonl").read_text().splitlines()]


def test_live_ssl_metrics_and_losses_land_in_the_history(dinov2_run):
    cfg, result = dinov2_run
    rows = history(result)
    watched = [r for r in rows if "ssl/rankme" in r]
    # the initial weights (the random-init baseline), then every eval_every steps, checkpoints included
    assert [r["step"] for r in watched] == [0, 40, 80]
    for row in watched:
        assert row["ssl/rankme"] >= 1.0 and 0.0 <= row["ssl/odcorr"] <= 1.0
        assert 0.0 <= row["ssl/knn_acc"] <= 1.0 and 0.0 <= row["ssl/linear_acc"] <= 1.0
    assert "ssl/collapse_warning" not in watched[0] and all("ssl/collapse_warning" in r for r in watched[1:])
    logged = [r for r in rows if "loss/dino" in r]
    assert logged and all({"loss/ibot", "loss/koleo"} <= set(r) for r in logged)
    assert all(r["loss/dino"] > 0 and r["loss/ibot"] > 0 for r in logged)
    assert "loss/kde" not in logged[0]


def test_the_teacher_is_exported_as_an_embedding_package_that_embeds(dinov2_run):
    from pathray.models.package import read_model_package
    from pathray.training.evaluate import load_checkpoint

    cfg, result = dinov2_run
    package = read_model_package(result.paths["model"])
    assert package.config.task.name == "embedding" and package.config.input.tile_size == 64
    model, task = package.build()
    tiles = torch.randint(0, 255, (3, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        embeddings = task.predict(model(tiles))
    assert embeddings.shape == (3, model.engine.embed_dim) and embeddings.dtype == "float32"
    # what `pathray embed --model <run>/model` loads: the same embeddings, its 64 px tiles
    from pathray.inference.embedder import load_embedder

    embedder = load_embedder(result.paths["model"], device="cpu")
    assert (embedder.tile_size, embedder.mpp) == (64, 1.0) and not embedder.source.random_init
    import numpy as np

    np.testing.assert_allclose(
        embedder.embed(tiles.numpy()).astype("float32"), embeddings, rtol=1e-2, atol=1e-2
    )
    # the package holds the teacher's backbone, not the student's
    saved = load_checkpoint(result.checkpoint)
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(package.state[f"engine.backbone.{key}"], saved["teacher"][f"backbone.{key}"])
    assert not torch.equal(package.state[f"engine.backbone.{key}"], saved["model"][f"engine.backbone.{key}"])


def test_the_exported_package_is_what_a_fine_tuning_engine_loads(dinov2_run):
    from pathray.models.config import EngineConfig
    from pathray.models.engines import build_engine
    from pathray.models.package import read_model_package

    cfg, result = dinov2_run
    package = read_model_package(result.paths["model"])
    arch = cfg.engine.model_dump(include={"name", "model", "model_kwargs", "img_size"})
    engine = build_engine(EngineConfig(**arch, weights=result.paths["model"]))  # strictly loaded
    for key, value in engine.backbone.state_dict().items():
        assert torch.equal(value, package.state[f"engine.backbone.{key}"]), key


def test_the_midnight_config_trains_a_few_steps_with_kde_hed_and_the_hsv_filter(ray_local, project, tmp_path):
    from pathray.training.trainer import run_training

    cfg = project(
        "midnight",
        *SMALL,
        "data.stream.sampler.mpps=[0.5,1.0,2.0]",
        "scale.workers=1",
        "train.steps=4",
        "train.batch_size=8",
        "train.val_tiles_per_slide=8",
        "train.eval_every=4",
        config="midnight-pretrain.yaml",
    )
    assert cfg.task.regulariser == "kde" and cfg.data.stream.augment.hsv_filter
    result = run_training(cfg)
    rows = history(result)
    assert any("loss/kde" in r and math.isfinite(r["loss/kde"]) for r in rows)
    assert not any("loss/koleo" in r for r in rows)
    assert [r["step"] for r in rows if "ssl/rankme" in r] == [0, 4]


def test_the_collapse_warning_fires_below_its_share_of_the_trained_peak():
    from types import SimpleNamespace

    from pathray.models.tasks import SslConfig
    from pathray.training.loop import Validation

    job = SimpleNamespace(task=SimpleNamespace(config=SslConfig(collapse_fraction=0.5)))
    val = Validation([])
    seen = [val.watch({"ssl/rankme": r}, job)["ssl/collapse_warning"] for r in (10.0, 30.0, 16.0, 14.0, 40.0)]
    assert seen == [0.0, 0.0, 0.0, 1.0, 0.0]  # 14 < 0.5 x 30; a new peak clears it
    restored = Validation([])  # a restarted run remembers the peak, but not the initial weights'
    restored.restore([{"step": 0, "ssl/rankme": 99.0}, {"step": 10, "ssl/rankme": 30.0}])
    assert restored.peak_rankme == 30.0
    assert restored.watch({"ssl/rankme": 14.0}, job)["ssl/collapse_warning"] == 1.0


def test_the_high_resolution_phase_resumes_the_first_run_at_the_larger_size(
    dinov2_run, tmp_path, monkeypatch
):
    """configs/dinov2-highres.yaml starts from the first run's newest checkpoint at a larger input:
    student, teacher and heads as they were (position embeddings resampled to the new grid), a
    fresh step count. One step at lr 0 with the teacher's momentum at 1 changes no weight, so its
    checkpoint holds exactly the first run's weights."""
    from pathray.config import load_config
    from pathray.training.evaluate import load_checkpoint
    from pathray.training.trainer import init_checkpoint, run_training

    cfg, result = dinov2_run
    monkeypatch.setenv("PATHRAY_SSL_RUN", result.run_dir)
    high = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "dinov2-highres.yaml",
        [
            f"data.manifest={cfg.data.manifest}",
            "scale.workers=1",
            "scale.cpus_per_worker=1",
            "data.stream.readers=1",
            f"run.storage_path={tmp_path}",
            "run.name=highres",
            *SMALL,
            "engine.img_size=96",
            "data.stream.sampler.size=96",
            "data.stream.augment.global_size=96",
            "optim.lr=0.0",
            "optim.weight_decay=0.0",
            "optim.weight_decay_end=null",
            "task.ema_momentum=1.0",
            "train.steps=1",
            "train.batch_size=4",
            "train.val_tiles_per_slide=4",
            "train.eval_split=null",
            "run.checkpoint_every=1",
        ],
    )
    assert high.train.init_from == result.run_dir and high.engine.weights is None
    first = init_checkpoint(result.run_dir)
    second = run_training(high)
    assert [r["step"] for r in history(second) if "ssl/rankme" in r][0] == 0  # a fresh step count
    latest = sorted(p for p in Path(second.run_dir).glob("checkpoint_*") if p.is_dir())[-1]
    saved = load_checkpoint(latest)
    for entry in ("model", "teacher_model"):
        before, after = first[entry], saved[entry]
        assert before.keys() == after.keys()
        pos = [k for k in before if k.endswith("pos_embed")]
        assert pos and all(after[k].shape[1] == 1 + (96 // 16) ** 2 != before[k].shape[1] for k in pos)
        same = [k for k in before if k not in pos]
        assert all(torch.equal(before[k], after[k]) for k in same), entry


def fixed_tiles(batches) -> dict:
    """Collated tile batches as one set, sorted by (slide, x, y): the same tiles in the same order
    whatever order Ray Data delivered them in."""
    rows = list(batches)
    keys = ("image", "target", "slide_id", "x", "y")
    cat = {
        k: torch.cat([b[k] for b in rows])
        if torch.is_tensor(rows[0][k])
        else sum((list(b[k]) for b in rows), [])
        for k in keys
    }
    order = sorted(
        range(len(cat["x"])), key=lambda i: (cat["slide_id"][i], int(cat["x"][i]), int(cat["y"][i]))
    )
    return {k: v[order] if torch.is_tensor(v) else [v[i] for i in order] for k, v in cat.items()}


def test_a_short_dinov2_run_beats_its_random_init_on_the_knn_probe(ray_local, manifest_path):
    """100 DINOv2 steps of 32 tiles (2 global 64 px + 2 local 32 px crops, debug ViT) raise the
    teacher's kNN probe accuracy on the fixed held-out tile set over the same backbone at step 0.

    Deterministic: a fixed pool of unlabelled tiles (576, drawn once from every slide, as an SSL
    stream would, at coordinates the held-out draw does not use) sorted by position, batches and
    crops from a seeded generator, the optimiser step of the training loop (``optimizer_step``).
    A Ray stream's arrival order varies with load, which moved the same 80-step run from +0.10
    alone to +0.01 under the full suite. Seen at 100 steps: seeds 0, 1, 2 gave 0.382 -> 0.521,
    0.368 -> 0.465, 0.410 -> 0.479 (+0.139, +0.097, +0.069). Required: seed 0 gains >= 0.05."""
    import numpy as np

    from pathray.config import load_config
    from pathray.datasets.augment import multicrop
    from pathray.datasets.manifest import load_manifest
    from pathray.models.metrics import ssl_scores
    from pathray.training.evaluate import EvalTiles, embed_batches
    from pathray.training.learners import DinoLearner, DinoV2Learner, WorkerJob
    from pathray.training.loop import build_optimizer, optimizer_step
    from pathray.training.trainer import val_tiles

    steps, seed = 100, 0
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "dinov2-pretrain.yaml",
        [f"data.manifest={manifest_path}", *SMALL, f"train.steps={steps}"],
    )
    manifest = load_manifest(str(manifest_path))
    task = cfg.task_spec()
    probe_task, sampler, ssl = DinoLearner.val_tiles(task)
    held_out = fixed_tiles(val_tiles(cfg, manifest, probe_task, sampler, ssl))
    stream = cfg.data.stream.model_copy(update={"seed": cfg.data.stream.seed + 7})  # another draw
    pool = EvalTiles(manifest, stream, cfg.storage, cfg.tissue, None, 96, 64, "tiles")
    images = fixed_tiles(pool.batches(probe_task, "random_tissue"))["image"].numpy()
    assert len(images) == 96 * len(manifest) and len(held_out["x"]) >= 200

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    learner = DinoV2Learner(cfg.engine, task)
    learner.rng = np.random.default_rng(seed)  # the block masks
    job = WorkerJob.from_project(cfg)
    optimizer, scheduler = build_optimizer(learner.model, job)

    def knn() -> float:
        x, y, slides = embed_batches(learner.teacher.engine, [held_out])
        return ssl_scores(x, y, slides)["knn_acc"]

    before = knn()
    for step in range(steps):
        views = [
            multicrop(images[i], cfg.data.stream.augment, rng)
            for i in rng.choice(len(images), 32, replace=False)
        ]
        batch = {k: torch.from_numpy(np.stack([v[k] for v in views])) for k in views[0]}
        loss, _ = learner.loss(batch, step / steps)
        loss.backward()
        optimizer_step(learner, optimizer, scheduler, job, step)
    after = knn()
    assert after >= before + 0.05, (before, after)


def test_dinov2_starts_from_a_preset_and_its_local_weights(tmp_path):
    """``engine.preset`` + ``engine.weights`` (a checkpoint in the preset's published timm layout,
    kaiko's ViT-S/16 made 2 blocks deep): student and teacher start from exactly those weights
    (position embedding resampled to 64 px crops), and a DINOv2 step trains the student from there."""
    import numpy as np

    from pathray.config import load_config
    from pathray.datasets.augment import multicrop
    from pathray.models.foundation import build_backbone
    from pathray.models.presets import get_preset
    from pathray.training.learners import DinoV2Learner, WorkerJob
    from pathray.training.loop import build_optimizer, optimizer_step

    torch.manual_seed(1)
    published = build_backbone(get_preset("kaiko_vits16").replace(model_kwargs={"depth": 2})).state_dict()
    torch.save(published, tmp_path / "kaiko.pth")
    small = [o for o in SMALL if not o.startswith(("engine.name", "engine.model", "engine.img_size"))]
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs" / "dinov2-pretrain.yaml",
        [
            *small,
            "engine.preset=kaiko_vits16",
            "engine.model=null",
            "engine.model_kwargs={depth: 2}",
            f"engine.weights={tmp_path / 'kaiko.pth'}",
            "engine.img_size=64",
            "train.steps=10",
        ],
    )
    torch.manual_seed(0)
    learner = DinoV2Learner(cfg.engine, cfg.task_spec())
    for net in (learner.model, learner.teacher):
        state = net.engine.backbone.state_dict()
        assert state.keys() == published.keys()
        assert state["pos_embed"].shape[1] == 1 + 4 * 4 != published["pos_embed"].shape[1]
        assert all(torch.equal(state[k], published[k]) for k in published if k != "pos_embed")

    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    views = [multicrop(t, cfg.data.stream.augment, rng) for t in tiles]
    batch = {k: torch.from_numpy(np.stack([v[k] for v in views])) for k in views[0]}
    job = WorkerJob.from_project(cfg)
    optimizer, scheduler = build_optimizer(learner.model, job)
    loss, _ = learner.loss(batch, 0.0)
    loss.backward()
    optimizer_step(learner, optimizer, scheduler, job, 0)
    assert torch.isfinite(loss)
    moved = learner.model.engine.backbone.state_dict()["blocks.1.attn.qkv.weight"]
    assert not torch.equal(moved, published["blocks.1.attn.qkv.weight"])
