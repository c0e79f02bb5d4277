"""The demo's training stage: DINO on online-patched tiles, then foundation vs CNN as an experiment."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from pathray.config import load_config
from pathray.storage import StorageConfig
from pathray.training.config import ProjectConfig

# Small enough for 2 CPUs in a few minutes; the same code trains ViT-S/16 on GPUs.
ENGINE = ["engine.name=foundation", "engine.model=vit_tiny_patch16_224"]


def demo_configs(out: Path, manifest_uri: str, steps: int) -> tuple[ProjectConfig, ProjectConfig]:
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
        model=ProjectConfig,
        overrides=[
            *common,
            "run.name=demo-dino",
            "task.name=ssl",
            "task.out_dim=1024",
            "data.split=unlabelled",
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
        model=ProjectConfig,
        overrides=[
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
            "train.val_tiles_per_slide=24",
            "optim.lr=3e-4",
            "optim.warmup_steps=5",
            f"run.checkpoint_every={max(5, steps // 4)}",  # val scores: F1 against iterations
            "run.keep_checkpoints=1",
        ],
    )
    return dino, seg


def run_demo_training(
    out: Path,
    manifest: Any,
    manifest_uri: str,
    storage: StorageConfig,
    console: Console,
    steps: int = 40,
    seeds: int = 1,
) -> dict[str, Any]:
    """Pretrain with DINO on the unlabelled slides, then fine-tune both engines at 10 % and 100 % of
    the labelled ones, ``seeds`` times each (an experiment)."""
    from pathray.training.trainer import run_training

    dino, seg = demo_configs(out, manifest_uri, steps)
    dino = dino.model_copy(update={"storage": storage})
    unlabelled = int((manifest["split"] == "unlabelled").sum())
    labelled = int((manifest["split"] == "train").sum())
    with console.status(
        f"DINO pretraining ({dino.train.steps} steps, {dino.engine.model}) on online-patched tiles of "
        f"{unlabelled} unlabelled slides ({labelled} are labelled)"
    ):
        pre = run_training(dino, manifest)
    m = pre.metrics
    console.print(
        f"DINO: loss {m.get('loss', float('nan')):.3f}, RankMe {m.get('test/rankme', float('nan')):.1f}, "
        f"linear probe accuracy {m.get('test/probe_accuracy', float('nan')):.2f}"
    )
    weights = str(Path(str(pre.checkpoint)) / "checkpoint.pt")
    seg = seg.model_copy(update={"storage": storage})
    experiment = run_demo_experiment(out, seg, weights, console, seeds, labelled)
    return {"dino": pre, **experiment}


def run_demo_experiment(
    out: Path, seg: ProjectConfig, dino_weights: str, console: Console, seeds: int = 1, labelled: int = 0
) -> dict[str, Any]:
    """Foundation (from the DINO teacher) vs CNN (random init) at 10 % and 100 % of the labelled
    slides, ``seeds`` runs each, scored over whole test slides; the seed's figures beside them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pathray.config import dump_config
    from pathray.training.experiment import ExperimentConfig, cell_configs, load_experiment, run_experiment
    from pathray.training.experiment_report import SUMMARY_COLUMNS, markdown_table, summary

    base = out / "configs" / "demo-segmentation.yaml"
    base.parent.mkdir(parents=True, exist_ok=True)
    base.write_text(dump_config(seg))
    experiment = {
        "experiment": {
            "name": "demo",
            "base": base.name,
            "engines": ["foundation", "cnn"],
            "fractions": [0.1, 1.0],
            "workers": [1],
            "seeds": list(range(seeds)),
            "engine_set": {
                "foundation": [f"engine.weights={dino_weights}"],
                "cnn": ["engine.model=resnet18", "engine.weights=null", "optim.lr=1e-3"],
            },
            "out": str(out / "experiments"),
        }
    }
    ExperimentConfig.model_validate(experiment)
    path = base.parent / "demo-experiment.yaml"
    path.write_text(yaml.safe_dump(experiment, sort_keys=False))
    exp = load_experiment(path)
    runs = len(cell_configs(exp, Path(exp.out) / exp.name))
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("fine-tuning", total=runs)

        def advance(done: int, total: int, name: str) -> None:
            progress.update(task, completed=done, total=total, description=f"fine-tuning {name}")

        result = run_experiment(exp, progress=advance)
    console.print(
        f"experiment: foundation (DINO-initialised ViT) vs CNN (random init), segmentation, at 10 % "
        f"(1 slide at least) and 100 % of {labelled} labelled slides, {seeds} seed(s) each; macro F1 over "
        "every annotated region of the test slides, 95 % intervals"
    )
    cells = summary(result.table)
    console.print(markdown_table(cells, list(SUMMARY_COLUMNS)))
    report = Path(result.paths["report"]).read_text()
    shown = ("## 1", "## 2", "## 3", "- at ", "- foundation at", "- seconds per")
    curves = False  # inside the F1-against-iterations section: its table is shown whole
    for line in report.splitlines():
        curves = line.startswith("## F1 against") or (curves and not line.startswith("## "))
        if (curves and line.strip()) or line.startswith(shown):
            console.print(line.removeprefix("## "))
    at_full = cells[cells["fraction"] == 1.0].sort_values("macro_f1", ascending=False).iloc[0]
    runs = result.table[(result.table["fraction"] == 1.0) & (result.table["engine"] == at_full["engine"])]
    best = runs.sort_values("macro_f1", ascending=False).iloc[0]
    console.print(
        f"better model at 100 %: {at_full['engine']} (mean macro F1 {at_full['macro_f1']:.3f} over "
        f"{int(at_full['runs'])} run(s)); serving its best run, seed {int(best['seed'])} "
        f"({best['macro_f1']:.3f})"
    )
    console.print(f"{'study report:':28s} {result.paths['report']}")
    return {"experiment": result, "best": best.to_dict()}
