"""Experiments: a grid of Ray Train runs (engines x training fractions x workers) -> table and plots.

pathray experiment configs/experiment-engines.yaml                       # the seed study's grid
pathray experiment configs/experiment-engines.yaml --set experiment.workers=[1,2,4]

Each cell is an ordinary ``run_training`` of the base project config with the engine, the
fraction of annotated training slides (nested subsets, the same held-out slides) and the
number of workers set; ``results.parquet``, ``results.md`` and three plots gather them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import Field

from pathray.section import Section, load_section
from pathray.training.config import ProjectConfig


class ExperimentSection(Section):
    """The grid and where its runs and results go."""

    name: str = "experiment"
    base: str = Field(..., description="project config every cell starts from (relative to this file)")
    engines: list[str] = Field(
        default_factory=lambda: ["foundation", "cnn"],
        description="registered engines, or foundation presets (uni, kaiko_vits16: on the foundation engine)",
    )
    fractions: list[float] = Field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    workers: list[int] = Field(default_factory=lambda: [1])
    seeds: list[int] = Field(
        default_factory=lambda: [0],
        description="repeats: every cell trains once per seed (its own nested subset, init and stream)",
    )
    set: list[str] = Field(default_factory=list, description="overrides for every cell (a.b=value)")
    engine_set: dict[str, list[str]] = Field(default_factory=dict, description="overrides per engine")
    out: str = Field("runs/experiments", description="folder of the runs and the results")


class ExperimentConfig(Section):
    """An experiment file: an ``experiment:`` section."""

    experiment: ExperimentSection


@dataclass
class ExperimentResult:
    """Where the table and plots are, and the table itself."""

    out: Path
    table: Any
    paths: dict[str, str]


def load_experiment(path: str | Path, overrides: list[str] | None = None) -> ExperimentSection:
    """An experiment file's section: ``base`` resolved against the file's folder and ``out`` against the
    working directory, both made absolute (a Ray job's driver may change directory once Ray is up)."""
    path = Path(path)
    exp = load_section(ExperimentConfig, path, overrides or []).experiment
    base = (path.parent / exp.base).absolute()  # an absolute base stays as it is
    return exp.model_copy(update={"base": str(base), "out": str(Path(exp.out).absolute())})


def cell_config(
    exp: ExperimentSection, root: Path, engine: str, fraction: float, workers: int, seed: int = 0
) -> ProjectConfig:
    """The project config of one cell: base file < experiment overrides < the cell's own values."""
    name = f"{exp.name}-{engine}-f{round(fraction * 100):03d}-w{workers}"
    name += f"-s{seed}" if len(exp.seeds) > 1 else ""
    overrides = [
        *engine_overrides(engine),
        *exp.set,
        *exp.engine_set.get(engine, []),
        f"data.fraction={fraction}",
        f"scale.workers={workers}",
        f"train.seed={seed}",
        f"run.name={name}",
        f"run.storage_path={(root / 'runs').absolute()}",
    ]
    return load_section(ProjectConfig, exp.base, overrides)


def engine_overrides(engine: str) -> list[str]:
    """What a cell's engine entry sets: a registered engine by name, or a foundation preset on the
    foundation engine (a preset is just another engine entry of the grid)."""
    from pathray.models.engines import ENGINES
    from pathray.models.presets import preset_names

    if engine not in ENGINES and engine in preset_names():
        return ["engine.name=foundation", "engine.model=null", f"engine.preset={engine}"]
    return [f"engine.name={engine}"]


def cell_configs(exp: ExperimentSection, root: Path) -> list[ProjectConfig]:
    """Every cell's project config, in the order they run (each validated: a bad cell fails here)."""
    cells = itertools.product(exp.engines, exp.fractions, exp.workers, exp.seeds)
    return [cell_config(exp, root, *cell) for cell in cells]


def cell_row(cfg: ProjectConfig, result: Any, seconds: float) -> dict[str, Any]:
    """One table row: the cell, its test scores, the constant baseline and its throughput."""
    nan = float("nan")
    history = [h for h in _history(result) if "steps_per_s" in h]
    steps_per_s = history[-1]["steps_per_s"] if history else nan
    images = cfg.train.batch_size * cfg.optim.grad_accum * cfg.scale.workers
    m = result.metrics
    return {
        "engine": cfg.engine.preset or cfg.engine.name,
        "model": cfg.engine.model or "",
        "fraction": cfg.data.fraction,
        "workers": cfg.scale.workers,
        "seed": cfg.train.seed,
        "steps": cfg.train.steps,
        "chosen_step": m.get("chosen_step", m.get("steps_trained", cfg.train.steps)),  # the val's pick
        "macro_f1": m.get("test/macro_f1", nan),
        "macro_f1_lo": m.get("test/macro_f1_lo", nan),  # bootstrap over the test slides
        "macro_f1_hi": m.get("test/macro_f1_hi", nan),
        "dice": m.get("test/dice", nan),
        "baseline_macro_f1": m.get("baseline/macro_f1", nan),
        "coverage": m.get("test/coverage", nan),
        "test_slides": m.get("test/slides", nan),
        "seconds_per_slide": m.get("test/seconds_per_slide", nan),
        "images_per_s": steps_per_s * images,
        "data_wait_share": history[-1].get("data_wait_share", nan) if history else nan,
        "seconds": seconds,
        "run_dir": result.run_dir,
        "model_uri": result.paths.get("model", ""),
    }


def _history(result: Any) -> list[dict[str, Any]]:
    import json

    path = result.paths.get("history")
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def run_experiment(
    exp: ExperimentSection,
    progress: Callable[[int, int, str], None] | None = None,
    step_progress: Callable[[ProjectConfig, dict[str, Any]], None] | None = None,
) -> ExperimentResult:
    """Run every cell of the grid (``load_experiment``), one Ray Train run after another; write the
    table and plots.

    Every cell's config is validated before the first run starts. Needs a running Ray.
    ``progress(done, total, name)`` sees each cell start; ``step_progress(cell, row)`` sees every
    report of the running cell (step, loss, lr, tiles/s, data wait, ETA), as ``pathray train`` shows.
    """
    import pandas as pd

    from pathray.training.experiment_report import write_report
    from pathray.training.tracking import check_tracking
    from pathray.training.trainer import run_training

    root = Path(exp.out) / exp.name
    cells = cell_configs(exp, root)
    for cfg in cells:
        check_tracking(cfg.tracking)  # a missing MLflow fails here, not after the first cell trained
    root.mkdir(parents=True, exist_ok=True)
    rows, histories = [], {}
    for i, cfg in enumerate(cells):
        if progress is not None:
            progress(i, len(cells), cfg.run.name)
        t0 = time.perf_counter()
        result = run_training(cfg, progress=None if step_progress is None else partial(step_progress, cfg))
        rows.append(cell_row(cfg, result, time.perf_counter() - t0))
        histories[cfg.run.name] = _history(result)
    if progress is not None:
        progress(len(cells), len(cells), "")
    table = pd.DataFrame(rows)
    paths = write_report(table, histories, root)
    return ExperimentResult(root, table, paths)
