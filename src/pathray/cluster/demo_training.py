"""The demo's training stage: DINO on online-patched tiles, then segmentation fine-tuned from its teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console

from pathray.config import PathrayConfig, load_config
from pathray.wsi.storage import StorageConfig

# Small enough for 2 CPUs in a few minutes; the same code trains ViT-S/16 on GPUs.
ENGINE = ["engine.name=foundation", "engine.model=vit_tiny_patch16_224", "engine.img_size=96"]


def demo_configs(out: Path, manifest_uri: str, steps: int) -> tuple[PathrayConfig, PathrayConfig]:
    """The DINO and the fine-tuning project configs the demo runs (embedded: no files needed)."""
    common = [
        f"data.manifest={manifest_uri}",
        "data.check_uris=false",
        "data.stream.readers=1",
        "scale.workers=1",
        f"run.storage_path={out / 'runs'}",
        "run.log_every=5",
        "train.batch_size=8",
        *ENGINE,
    ]
    dino = load_config(
        None,
        [
            *common,
            "run.name=demo-dino",
            "task.name=ssl",
            "task.out_dim=1024",
            "data.split=null",
            "data.stream.target.task=ssl",
            "data.stream.sampler.kind=random_tissue",
            "data.stream.sampler.size=128",
            "data.stream.sampler.mpps=[0.5, 1.0]",
            "data.stream.sampler.tiles_per_slide=64",
            "data.stream.augment.global_size=96",
            "data.stream.augment.local_size=48",
            "data.stream.augment.local_crops=2",
            f"train.steps={max(4, steps // 2)}",
            "train.eval_split=null",
            "optim.lr=5e-4",
            "optim.layer_decay=1.0",
            "optim.warmup_steps=3",
            f"run.checkpoint_every={max(4, steps // 2)}",
        ],
    )
    seg = load_config(
        None,
        [
            *common,
            "run.name=demo-segmentation",
            "task.name=segmentation",
            "data.split=train",
            "data.stream.sampler.kind=class_balanced",
            "data.stream.sampler.size=96",
            "data.stream.sampler.mpps=[1.0]",
            "data.stream.sampler.tiles_per_slide=64",
            f"train.steps={steps}",
            "train.eval_tiles_per_slide=24",
            "optim.lr=3e-4",
            "optim.warmup_steps=5",
            f"run.checkpoint_every={steps}",
        ],
    )
    return dino, seg


def run_demo_training(
    out: Path, manifest: Any, manifest_uri: str, storage: StorageConfig, console: Console, steps: int = 40
) -> dict[str, Any]:
    """Pretrain with DINO, fine-tune segmentation from the DINO teacher, print what it scored."""
    from pathray.training.trainer import run_training

    dino, seg = demo_configs(out, manifest_uri, steps)
    dino = dino.model_copy(update={"storage": storage})
    with console.status(
        f"DINO pretraining ({dino.train.steps} steps, {dino.engine.model}) on online-patched tiles"
    ):
        pre = run_training(dino, manifest)
    console.print(f"DINO: loss {pre.metrics.get('loss', float('nan')):.3f}, checkpoint {pre.checkpoint}")
    weights = str(Path(str(pre.checkpoint)) / "checkpoint.pt")
    seg = seg.model_copy(
        update={"storage": storage, "engine": seg.engine.model_copy(update={"weights": weights})}
    )
    with console.status(f"fine-tuning segmentation ({seg.train.steps} steps) from the DINO teacher"):
        fine = run_training(seg, manifest)
    m = fine.metrics
    console.print(
        f"segmentation on held-out slides: macro F1 {m.get('test/macro_f1', float('nan')):.3f}, "
        f"Dice {m.get('test/dice', float('nan')):.3f} "
        f"(always predicting the commonest class: macro F1 {m.get('baseline/macro_f1', float('nan')):.3f})"
    )
    return {"dino": pre, "segmentation": fine}
