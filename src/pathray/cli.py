"""The ``pathray`` command: thin, every subcommand calls into the subpackages.

pathray demo                          # synthetic slides -> embedded S3 -> read back -> masks
pathray slides info s3://bucket/a.svs --json
pathray slides tissue slide.svs --out mask.png
pathray slides synth out/ --n 8 --seed 0 --size 20000
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from pathray.config import PathrayConfig, load_config
from pathray.section import ConfigError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n")[0])
slides_app = typer.Typer(no_args_is_help=True, help="Open, inspect and synthesise whole-slide images.")
app.add_typer(slides_app, name="slides")
data_app = typer.Typer(no_args_is_help=True, help="Split manifests; look at the online-patched tile stream.")
app.add_typer(data_app, name="data")

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config file")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="override a config key: a.b=value")]
MppOpt = Annotated[float | None, typer.Option(help="override the level-0 µm/px")]
DashboardOpt = Annotated[
    bool, typer.Option("--dashboard", help="start the local Ray dashboard (on 127.0.0.1) and print its URL")
]


def fail(message: str, code: int = 2) -> None:
    """One line on stderr and a non-zero exit: errors are for people, not stack traces."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly(func: F) -> F:
    """Turn pathray's own errors into one line on stderr with exit code 2."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pathray.cluster.jobs import ClusterError
        from pathray.datasets.manifest import ManifestError
        from pathray.storage import StorageError

        try:
            return func(*args, **kwargs)
        except (StorageError, ConfigError, ManifestError, ClusterError) as exc:
            fail(str(exc))

    return wrapper  # type: ignore[return-value]


def _config(config: Path | None, overrides: list[str] | None) -> PathrayConfig:
    return load_config(config, overrides or [])


def _experiment(config: Path, overrides: list[str]) -> tuple[Any, Any]:
    """An experiment and the storage of its cells, every cell's config checked (here, not on Ray)."""
    from pathray.training.experiment import cell_configs, load_experiment

    exp = load_experiment(config, overrides)
    cells = cell_configs(exp, Path(exp.out) / exp.name)
    return exp, (cells[0] if cells else PathrayConfig()).storage


def _start_ray(storage: Any, trains: bool = False, dashboard: bool = False) -> None:
    """Attach to ``RAY_ADDRESS`` or start a local Ray; credentials given in the config are put into
    this process's environment first, where a local Ray's workers read them (never in their config).

    ``trains``: the command builds models in this process (evaluation, export), so torch and timm
    are imported before Ray starts. In a Ray job with a working_dir (``pathray submit``) the CPU
    torch imported after ``ray.init`` aborts ("Intel oneMKL FATAL ERROR: Cannot load
    .../libtorch_cpu.so", Ray 2.60 + torch 2.13), and importing timm reads the working directory,
    which the job's runtime env may have removed by the time training ends (seen with two nodes
    sharing one machine's temp dir).

    ``dashboard``: a local Ray starts its dashboard on 127.0.0.1; its URL (or an attached cluster's)
    is printed on stderr.
    """
    from pathray.cluster.ray_local import ensure_ray

    if trains:
        from pathray.models.timm_compat import import_timm

        import_timm()

    storage.export_env()
    url = ensure_ray(dashboard=dashboard)
    if url:
        # Ray's token auth (on by default for a local Ray) guards the dashboard's API too.
        signin = "  (sign in with `ray get-auth-token`)" if os.environ.get("RAY_AUTH_MODE") == "token" else ""
        typer.echo(f"Ray dashboard: {url}{signin}", err=True)


@slides_app.command("info")
@friendly
def slides_info(
    uri: Annotated[str, typer.Argument(help="path or URI (s3://, gs://, http(s)://, memory://, file://)")],
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
    mpp: MppOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Print a slide's dimensions, levels, mpp, vendor and reader."""
    from pathray.wsi.backends.open import open_slide

    cfg = _config(config, overrides)
    slide = open_slide(uri, cfg.storage, mpp=mpp)
    slide.check()
    info = slide.info()
    if as_json:
        typer.echo(json.dumps(info, indent=2, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False, title=uri)
    for key, value in info.items():
        table.add_row(key, json.dumps(value, ensure_ascii=False) if isinstance(value, list) else str(value))
    Console().print(table)


@slides_app.command("tissue")
@friendly
def slides_tissue(
    uri: Annotated[str, typer.Argument(help="path or URI of the slide")],
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write the mask to")] = Path("mask.png"),
    mpp: MppOpt = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Write the slide's tissue mask as a PNG (white: tissue)."""
    from pathray.wsi.backends.open import open_slide
    from pathray.wsi.patching.tissue import tissue_mask

    cfg = _config(config, overrides)
    slide = open_slide(uri, cfg.storage, mpp=mpp)
    mask = tissue_mask(slide, cfg.tissue)
    out.parent.mkdir(parents=True, exist_ok=True)
    mask.to_image().save(out)
    mpp_text = f"{mask.mpp:.2f} µm/px" if mask.mpp else "unknown µm/px"
    typer.echo(
        f"{out}: {mask.shape[1]}x{mask.shape[0]} px at {mpp_text} "
        f"(downsample {mask.downsample:.1f}), tissue {100 * mask.tissue_fraction_total:.1f}%"
    )


@slides_app.command("synth")
@friendly
def slides_synth(
    out: Annotated[Path, typer.Argument(help="folder for the slides, annotations and manifest")],
    n: Annotated[int, typer.Option("--n", help="number of slides")] = 8,
    seed: Annotated[int, typer.Option(help="random seed: the same seed gives the same files")] = 0,
    size: Annotated[int, typer.Option(help="level-0 width and height in pixels")] = 20000,
    uri_prefix: Annotated[
        str | None, typer.Option(help="URI prefix for the manifest (e.g. s3://b/slides)")
    ] = None,
) -> None:
    """Write synthetic H&E-like pyramidal slides, their GeoJSON ground truth and a manifest."""
    import pandas as pd

    from pathray.datasets.manifest import write_synthetic_dataset

    if n < 1 or size < 512:
        fail("--n must be at least 1 and --size at least 512")
    manifest = write_synthetic_dataset(out, n, size, seed=seed, uri_prefix=uri_prefix)
    for row in pd.read_parquet(manifest).itertuples():
        typer.echo(f"{row.uri}  {size}x{size}  label={row.label}  split={row.split}")
    typer.echo(f"manifest: {manifest}")


@data_app.command("preview")
@friendly
def data_preview(
    config: Annotated[Path, typer.Argument(help="project config (YAML) with a data: section")],
    n: Annotated[int, typer.Option("--n", help="tiles to show")] = 64,
    out: Annotated[Path, typer.Option("--out", "-o", help="PNG to write")] = Path("grid.png"),
    epoch: Annotated[int, typer.Option(help="which epoch's coordinates to draw")] = 0,
    overrides: SetOpt = None,
) -> None:
    """Stream tiles as CONFIG says and write a contact sheet with their targets drawn over them."""
    from pathray.datasets.preview import preview

    cfg = _config(config, overrides)
    _start_ray(cfg.storage)
    result = preview(cfg.data, cfg.task_spec(), cfg.storage, cfg.tissue, n, out, epoch=epoch)
    typer.echo(f"{result['out']}: {result['tiles']} tiles ({cfg.task.name}, split {cfg.data.split})")
    faults = result["faults"]
    for uri, cause in faults["failed_slides"].items():
        typer.echo(f"left out {uri}: {cause}", err=True)
    if faults["skipped_tiles"]:
        typer.echo(f"skipped {faults['skipped_tiles']} unreadable tile(s)", err=True)


def _split_column(frame: Any, name: str | None, default: str, what: str) -> str | None:
    """The column to group or stratify by: ``name`` (which must exist; 'none': no column), else
    ``default`` when the manifest has it, else None."""
    if name is None:
        return default if default in frame.columns else None
    if name.lower() == "none":
        return None
    if name not in frame.columns:
        fail(f"--{what} {name!r}: no such column (columns: {', '.join(map(str, frame.columns))})")
    return name


@data_app.command("split")
@friendly
def data_split(
    manifest: Annotated[str, typer.Argument(help="Parquet/CSV manifest: a path or any storage URI")],
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="where to write (.parquet/.csv); default NAME.split.EXT")
    ] = None,
    val: Annotated[float, typer.Option(help="share of slides for validation")] = 0.15,
    test: Annotated[float, typer.Option(help="share of slides for the test split")] = 0.15,
    seed: Annotated[int, typer.Option(help="the same seed gives the same splits")] = 0,
    group: Annotated[
        str | None,
        typer.Option(help="case column (default: case_id if present; none: each slide alone)"),
    ] = None,
    stratify: Annotated[
        str | None,
        typer.Option(help="column to stratify by (default: label if present; none: unstratified)"),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Write MANIFEST with a `split` column (train/val/test) and print slides, cases and labels per split.

    Splits are grouped (no case on two sides; a row without a case is its own case), stratified
    (each label keeps its share in every split, counted in slides) and seeded. A case whose slides
    carry different labels is not refused: it is stratified under its most common label (ties: the
    first in sorted order) and listed. An existing `split` column is replaced.
    """
    from pathray.datasets.manifest import load_manifest, save_manifest
    from pathray.datasets.splits import mixed_cases, split_counts, split_manifest

    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        fail(f"--val and --test must be shares in [0, 1) with a sum below 1, got {val:g} and {test:g}")
    cfg = _config(config, overrides)
    frame = load_manifest(manifest, cfg.storage)
    group_col = _split_column(frame, group, "case_id", "group")
    strat_col = _split_column(frame, stratify, "label", "stratify")
    fractions = {"train": 1.0 - val - test, "val": val, "test": test}
    split = split_manifest(frame, fractions, seed=seed, group=group_col, stratify=strat_col)
    if out is None:
        stem, dot, suffix = manifest.rpartition(".")
        out = f"{stem}.split.{suffix}" if dot else f"{manifest}.split.parquet"
    written = save_manifest(split, out, cfg.storage)
    counts = split_counts(split, group_col, strat_col)
    typer.echo(counts.reset_index().to_string(index=False))
    typer.echo(
        f"grouped by: {group_col or '(each slide its own case)'}; stratified by: {strat_col or '(none)'}"
    )
    mixed = mixed_cases(split, group_col, strat_col)
    if mixed:
        shown = ", ".join(mixed[:10]) + (", ..." if len(mixed) > 10 else "")
        typer.echo(
            f"{len(mixed)} case(s) with more than one {strat_col}, stratified by the most common: {shown}"
        )
    typer.echo(f"manifest: {written}")


def _train_mil(cfg: PathrayConfig, dashboard: bool) -> None:
    """k-fold cross-validation of the `mil:` section's model on `data.manifest`'s labelled slides."""
    from pathray.training.mil import plan_mil, run_mil

    if not cfg.data.manifest:
        fail("data.manifest is not set: MIL trains on the manifest's labels")
    assert cfg.mil is not None
    job = plan_mil(cfg.mil, cfg.data.manifest, cfg.storage, cfg.run)  # manifest, folds, files: before Ray
    _start_ray(cfg.storage, trains=True, dashboard=dashboard)
    resolved = {  # credentials are excluded fields: never part of a dump
        "data": {"manifest": cfg.data.manifest},
        **cfg.model_dump(mode="json", include={"storage", "scale", "run", "mil"}),
    }
    result = run_mil(job, cfg.scale, cfg.run, resolved=resolved)
    for line in result.lines:
        typer.echo(line)
    typer.echo(f"run:        {result.run_dir}")
    for name, path in result.paths.items():
        typer.echo(f"{name + ':':11s} {path}")


@app.command("train")
@friendly
def train(
    config: Annotated[
        Path, typer.Argument(help="project config (YAML): engine, task, data, optim, scale, run")
    ],
    overrides: SetOpt = None,
    dashboard: DashboardOpt = False,
) -> None:
    """Train the project's engine on its task with Ray Train; evaluate on the test split.

    A config with a ``mil:`` section cross-validates a slide-level model (ABMIL, mean-pool) on the
    tile embeddings of ``pathray embed`` instead (configs/mil-abmil.yaml).

    ``--set tracking.mlflow=true`` records the run in MLflow too (``tracking.uri``: where).
    """
    from pathray.training.progress import progress_line
    from pathray.training.tracking import check_tracking
    from pathray.training.trainer import run_training

    cfg = _config(config, overrides)
    if cfg.mil is not None:  # a `mil:` section: slide-level learning on tile embeddings
        _train_mil(cfg, dashboard)
        return
    check_tracking(cfg.tracking)
    _start_ray(cfg.storage, trains=True, dashboard=dashboard)
    result = run_training(cfg, progress=lambda row: typer.echo(progress_line(row, cfg.train.steps), err=True))
    kept = ("loss", "steps_trained", "stopped_early", "chosen_step", "val/best_score")
    shown = {k: v for k, v in result.metrics.items() if k.startswith(("test/", "baseline/")) or k in kept}
    for key, value in shown.items():
        typer.echo(f"{key:32s} {value:.4f}" if isinstance(value, float) else f"{key:32s} {value}")
    typer.echo(f"run:        {result.run_dir}")
    typer.echo(f"checkpoint: {result.checkpoint}")
    for name, path in result.paths.items():
        typer.echo(f"{name + ':':11s} {path}")


@app.command("experiment")
@friendly
def experiment_cmd(
    config: Annotated[
        Path, typer.Argument(help="experiment config (YAML): base project, engines, fractions, workers")
    ],
    overrides: SetOpt = None,
    dashboard: DashboardOpt = False,
) -> None:
    """Run a grid of training runs (engines x training fractions x workers); write a table and plots."""
    from pathray.training.experiment import run_experiment
    from pathray.training.progress import progress_line

    exp, storage = _experiment(config, overrides or [])
    _start_ray(storage, trains=True, dashboard=dashboard)

    def progress(done: int, total: int, name: str) -> None:
        typer.echo(f"[{done}/{total}] {name}" if name else f"[{done}/{total}] done", err=True)

    def step(cell: Any, row: dict[str, Any]) -> None:
        typer.echo(f"{cell.run.name}  {progress_line(row, cell.train.steps)}", err=True)

    result = run_experiment(exp, progress=progress, step_progress=step)
    from pathray.training.experiment_report import SUMMARY_COLUMNS, markdown_table, summary

    typer.echo(markdown_table(result.table))
    typer.echo(markdown_table(summary(result.table), list(SUMMARY_COLUMNS)))
    for name, path in result.paths.items():
        typer.echo(f"{name + ':':24s} {path}")


@app.command("serve")
@friendly
def serve_cmd(
    config: Annotated[Path, typer.Argument(help="serve config (YAML): stores, http, deployments, security")],
    overrides: SetOpt = None,
) -> None:
    """Serve whole-slide analysis over HTTP on Ray Serve (local Ray unless RAY_ADDRESS); Ctrl-C or
    SIGTERM (what Kubernetes and systemd send) takes the app down and exits 0."""
    import signal
    import time

    from pathray.serving.config import ServeAppConfig
    from pathray.serving.run import start_app, stop_app

    cfg = load_config(config, overrides or [], model=ServeAppConfig)
    cfg.serve.security.export_env()
    _start_ray(cfg.storage)
    url = start_app(cfg)
    # After start_app: ray.init sets its own SIGTERM handler (exit at once, app left behind), and
    # a process started in the background inherits SIGINT ignored.
    received: list[int] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, _frame: received.append(signum))
    typer.echo(f"serving on {url}  (API docs: {url}/docs, models from {cfg.serve.models})")
    while not received:
        time.sleep(0.5)
    stop_app(cfg, ray_ends=True)
    typer.echo("stopped")


@app.command("demo")
@friendly
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="where the demo writes its outputs")] = Path(
        "pathray-demo"
    ),
    store: Annotated[str, typer.Option(help="'s3' (embedded SeaweedFS on 127.0.0.1) or 'local'")] = "s3",
    n: Annotated[
        int, typer.Option("--n", help="synthetic slides: half unlabelled (DINO), a third train, a sixth test")
    ] = 24,
    size: Annotated[int, typer.Option(help="slide size in pixels")] = 4096,
    seed: Annotated[int, typer.Option(help="random seed")] = 0,
    steps: Annotated[int, typer.Option(help="fine-tuning steps (DINO gets half); 0 skips training")] = 40,
    seeds: Annotated[int, typer.Option(help="repeats of every fine-tuning run (seeds 0..N-1)")] = 2,
    dashboard: DashboardOpt = False,
) -> None:
    """Run pathray end to end on embedded defaults: nothing to set up but the install."""
    from pathray.demo.run import DemoOptions, run_demo

    if store not in ("s3", "local"):
        fail(f"--store must be 's3' or 'local', not {store!r}")
    if seeds < 1:
        fail(f"--seeds must be at least 1, not {seeds}")
    run_demo(
        DemoOptions(
            out=out, store=store, n=n, size=size, seed=seed, steps=steps, seeds=seeds, dashboard=dashboard
        )
    )


jobs_app = typer.Typer(no_args_is_help=True, help="Follow and stop jobs on a Ray cluster (Ray Jobs API).")
app.add_typer(jobs_app, name="jobs")
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="the cluster's dashboard, http://HEAD:8265 (or RAY_ADDRESS)")
]


def _key_values(items: list[str] | None) -> dict[str, str]:
    pairs = [item.partition("=") for item in items or []]
    bad = [k for k, eq, _ in pairs if not eq or not k]
    if bad:
        fail(f"--env wants KEY=VALUE, got {bad[0]!r}")
    return {k: v for k, _, v in pairs}


@app.command("submit")
@friendly
def submit_cmd(
    config: Annotated[Path, typer.Argument(help="project config (YAML) to train on the cluster")],
    address: AddressOpt = None,
    overrides: SetOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="follow the logs until the job ends")] = False,
    working_dir: Annotated[
        Path | None, typer.Option("--working-dir", help="a folder shipped with the job (manifests, ...)")
    ] = None,
    env: Annotated[list[str] | None, typer.Option("--env", help="KEY=VALUE for the job's processes")] = None,
    pip: Annotated[list[str] | None, typer.Option("--pip", help="extra pip requirement")] = None,
    command: Annotated[str, typer.Option(help="pathray subcommand to run: train or experiment")] = "train",
) -> None:
    """Submit `pathray train CONFIG` (or `pathray experiment CONFIG`) to a Ray cluster through the Jobs
    API; prints the job id. Storage credentials never travel with the job: the cluster has its own."""
    from pathray.cluster.jobs import BASE_NAME, Submission, refuse_credentials, submit
    from pathray.cluster.jobs import wait as wait_for

    overrides, variables = list(overrides or []), _key_values(env)
    files: dict[str, Path] = {}
    # A wrong key fails here, not minutes later on the cluster.
    if command == "train":
        storage = _config(config, overrides).storage
    elif command == "experiment":
        exp, storage = _experiment(config, overrides)
        files[BASE_NAME] = Path(exp.base)  # the base project travels beside the experiment file
        overrides.append(f"experiment.base={BASE_NAME}")
    else:
        fail(f"--command must be 'train' or 'experiment', not {command!r}")
    refuse_credentials(overrides, variables, (storage.key_env, storage.secret_env))
    sub = Submission(config, command, overrides, working_dir, variables, pip or [], files=files)
    job_id = submit(sub, address)
    typer.echo(f"submitted {job_id}")
    if wait:
        final = wait_for(job_id, address, echo=typer.echo)
        typer.echo(f"job {job_id}: {final}")
        if final != "SUCCEEDED":
            raise typer.Exit(1)


@jobs_app.command("status")
@friendly
def jobs_status(job_id: str, address: AddressOpt = None) -> None:
    """A job's status and message."""
    from pathray.cluster.jobs import status

    typer.echo(json.dumps(status(job_id, address), indent=2, default=str))


@jobs_app.command("logs")
@friendly
def jobs_logs(job_id: str, address: AddressOpt = None) -> None:
    """A job's driver logs so far."""
    from pathray.cluster.jobs import logs

    typer.echo(logs(job_id, address), nl=False)


@jobs_app.command("stop")
@friendly
def jobs_stop(job_id: str, address: AddressOpt = None) -> None:
    """Stop a running job."""
    from pathray.cluster.jobs import stop

    typer.echo(f"stopping {job_id}" if stop(job_id, address) else f"{job_id} had already ended")


class _Progress:
    """``progress(done, total)`` as a tqdm bar when tqdm is installed, else one rewritten stderr line."""

    def __init__(self, label: str) -> None:
        self.label, self.bar = label, None

    def __call__(self, done: int, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            sys.stderr.write(f"\r{self.label}: {done}/{total} tiles")
            sys.stderr.flush()
            return
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.label, unit="tile", file=sys.stderr)
        self.bar.total = total
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        else:
            sys.stderr.write("\n")


@app.command("analyze")
@friendly
def analyze_cmd(
    slide: Annotated[str | None, typer.Argument(help="slide path or URI (not with --manifest)")] = None,
    model: Annotated[
        str, typer.Option("--model", help="model package URI (or a model id with --endpoint)")
    ] = "",
    out: Annotated[str, typer.Option("--out", "-o", help="output folder or bucket prefix")] = "analysis",
    endpoint: Annotated[str | None, typer.Option(help="a pathray service URL; none: run in-process")] = None,
    token: Annotated[str | None, typer.Option(help="bearer token of the service")] = None,
    manifest: Annotated[
        str | None, typer.Option(help="Parquet/CSV of slides (uri, slide_id): analyse all on Ray Data")
    ] = None,
    actors: Annotated[int, typer.Option(help="--manifest: predictor actors")] = 1,
    out_mpp: Annotated[float | None, typer.Option(help="µm/px of the class map (inference.out_mpp)")] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="tiles per forward pass (inference.batch_size)")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (inference.device)")] = None,
    mpp: Annotated[
        float | None,
        typer.Option(help="the slide's level-0 µm/px, for slides without it (--manifest: its mpp column)"),
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Analyse a slide (class map, areas, Gleason score, GeoJSON, overlay) or a manifest of slides.

    Undecodable tiles are left out, counted in summary.json and hatched in the overlay; more than
    inference.max_failed_share of them fails the slide.
    """
    from pathray.wsi.backends.levels import MAX_PLAUSIBLE_MPP, plausible_mpp

    if not model:
        fail("--model is required (a model package URI, or a model id with --endpoint)")
    if (slide is None) == (manifest is None):
        fail("give either SLIDE or --manifest")
    if mpp is not None and plausible_mpp(mpp) is None:
        fail(f"--mpp must be a level-0 µm/px in (0, {MAX_PLAUSIBLE_MPP:g}], got {mpp:g}")
    if mpp is not None and manifest is not None:
        fail("--mpp is per slide; with --manifest, give the manifest an mpp column")
    flags = {"out_mpp": out_mpp, "batch_size": batch_size, "device": device}
    given = [f"inference.{k}={v}" for k, v in flags.items() if v is not None]
    cfg = _config(config, [*(overrides or []), *given])
    inference = cfg.inference
    if manifest is not None:
        from pathray.serving.batch import analyze_manifest
        from pathray.storage import join_uri

        _start_ray(cfg.storage)
        table = analyze_manifest(manifest, model, out, cfg.storage, inference, cfg.tissue, actors=actors)
        for row in table.itertuples():
            typer.echo(f"{row.status:6s} {row.slide_id}  {row.reason}")
        failed = int((table["status"] != "ok").sum())
        summary = join_uri(out, "summary.parquet")
        typer.echo(f"summary: {summary} ({len(table) - failed} ok, {failed} failed)")
        return
    assert slide is not None
    progress = _Progress(Path(slide.split("?")[0]).name)
    if endpoint:
        from pathray.serving.client import RemoteAnalysisError, analyze_remote

        try:
            summary = analyze_remote(endpoint, slide, model, out, token, progress, mpp=mpp)
        except RemoteAnalysisError as exc:
            fail(str(exc))
        finally:
            progress.close()
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from pathray.inference.analyze import analyze_slide
    from pathray.inference.outputs import write_outputs
    from pathray.inference.predictor import Predictor
    from pathray.wsi.backends import open_slide

    predictor = Predictor.from_package(model, cfg.storage, inference)
    try:
        result = analyze_slide(slide, predictor, cfg.storage, cfg.tissue, progress, mpp=mpp)
    finally:
        progress.close()
    files = write_outputs(result, out, open_slide(slide, cfg.storage, mpp=mpp), cfg.storage)
    typer.echo(json.dumps(result.summary(), indent=2, default=str))
    for name, uri in files.items():
        typer.echo(f"{name + ':':20s} {uri}")


@app.command("embed")
@friendly
def embed_cmd(
    slides: Annotated[str, typer.Argument(help="a manifest (Parquet/CSV: uri, slide_id, mpp) or a slide")],
    model: Annotated[str, typer.Option("--model", help="foundation preset, model package or timm name")],
    out: Annotated[str, typer.Option("--out", "-o", help="folder or bucket prefix: <slide_id>.parquet each")],
    weights: Annotated[
        str | None, typer.Option(help="weights of a preset or timm name (a timm name without: RANDOM)")
    ] = None,
    mpp: Annotated[float | None, typer.Option(help="µm/px of the tiles (default: the model's)")] = None,
    tile: Annotated[int | None, typer.Option(help="tile side in px (default: the model's)")] = None,
    overlap: Annotated[float, typer.Option(help="grid overlap fraction between neighbours")] = 0.0,
    min_tissue: Annotated[float, typer.Option(help="least tissue fraction of a tile")] = 0.05,
    batch: Annotated[int, typer.Option(help="tiles per forward pass")] = 64,
    actors: Annotated[int, typer.Option(help="model actors")] = 1,
    gpus_per_actor: Annotated[
        float | None, typer.Option(help="GPUs of each model actor (default: 1 if the cluster has GPUs)")
    ] = None,
    readers: Annotated[int | None, typer.Option(help="CPU reader actors (default: the CPUs left)")] = None,
    decode: Annotated[
        str,
        typer.Option(
            help="cpu: reader actors decode tiles; device: model actors fetch compressed tiles and "
            "decode them where the model runs (nvJPEG on a GPU); auto: device on GPUs"
        ),
    ] = "auto",
    slide_mpp: Annotated[
        float | None, typer.Option(help="level-0 µm/px of a slide without one (a manifest: its mpp column)")
    ] = None,
    model_kwarg: Annotated[
        list[str] | None, typer.Option("--model-kwarg", help="KEY=VALUE for a timm name (depth=1: tiny)")
    ] = None,
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Embed every tissue tile of a cohort: one Parquet file per slide (x, y, tissue, embedding).

    A slide already done by the same model is skipped (a repeated or crashed run resumes); a slide
    that fails is named and the others go on (exit code 1 when any failed).
    """
    import pandas as pd
    import yaml

    from pathray.serving.embed import MANIFEST_SUFFIXES, embed_slides

    if not 0.0 <= overlap < 1.0:
        fail(f"--overlap must be in [0, 1), got {overlap:g}")
    if mpp is not None and mpp <= 0:
        fail(f"--mpp must be > 0, got {mpp:g}")
    is_manifest = slides.split("?")[0].lower().endswith(MANIFEST_SUFFIXES)
    if slide_mpp is not None and is_manifest:
        fail("--slide-mpp is per slide; give the manifest an mpp column")
    kwargs = {k: yaml.safe_load(v) for k, v in _key_values(model_kwarg).items()}
    cfg = _config(config, overrides)
    source: Any = slides if is_manifest else pd.DataFrame({"uri": [slides], "mpp": [slide_mpp]})
    _start_ray(cfg.storage, trains=True)
    progress = _Progress("embed")
    try:
        report = embed_slides(
            source,
            model,
            out,
            weights=weights,
            storage=cfg.storage,
            tissue=cfg.tissue,
            tile_size=tile,
            mpp=mpp,
            overlap=overlap,
            min_tissue=min_tissue,
            batch_size=batch,
            actors=actors,
            gpus_per_actor=gpus_per_actor,
            readers=readers,
            decode=decode,
            model_kwargs=kwargs or None,
            progress=progress,
        )
    except ValueError as exc:  # another model's folder, duplicate slide ids, a model that does not load
        fail(str(exc))
    except RuntimeError as exc:
        if "Unknown model" not in str(exc):
            raise
        fail(f"unknown model {model!r}: not a preset (pathray models list), a model package or a timm name")
    finally:
        progress.close()
    for row in report.slides.itertuples():
        if row.status == "failed":
            typer.echo(f"failed  {row.slide_id}  {row.reason}")
    if report.source.random_init:
        typer.echo(f"warning: {model} has RANDOM weights (no --weights): for pipeline tests only", err=True)
    typer.echo(f"embeddings: {out}  {report.summary()}")
    if report.count("failed"):
        raise typer.Exit(1)


@app.command("eval")
@friendly
def eval_cmd(
    manifest: Annotated[str, typer.Argument(help="manifest (Parquet/CSV) of slides with annotations_uri")],
    model: Annotated[
        list[str], typer.Option("--model", help="foundation preset, model package or timm name (repeat)")
    ],
    out: Annotated[str, typer.Option("--out", "-o", help="folder or bucket prefix of the comparison")],
    weights: Annotated[
        list[str] | None, typer.Option("--weights", help="MODEL=PATH: weights of a preset or timm name")
    ] = None,
    seeds: Annotated[int, typer.Option(help="repeats, each with its own tiles and probe init")] = 3,
    tiles_per_class: Annotated[int, typer.Option(help="tiles of each class per split and seed")] = 64,
    mpp: Annotated[float | None, typer.Option(help="µm/px of every model's tiles (default: its own)")] = None,
    tile: Annotated[
        int | None, typer.Option(help="tile side in px for every model (default: its own)")
    ] = None,
    background: Annotated[
        bool, typer.Option("--background/--no-background", help="unannotated tissue is a class")
    ] = True,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    config: ConfigOpt = None,
    overrides: SetOpt = None,
) -> None:
    """Compare frozen models as eva does: linear and kNN probes on annotated tiles, mean ± std over
    seeds. Writes comparison.csv/.md/.png and results.json under --out and prints the table."""
    from pathray.datasets.manifest import load_manifest
    from pathray.inference.comparison import write_comparison
    from pathray.inference.probes import EvalConfig, ProbeError, compare_models, parse_weights
    from pathray.models.weights import WeightsError
    from pathray.registry import RegistryError

    if seeds < 1 or tiles_per_class < 1:
        fail("--seeds and --tiles-per-class must be at least 1")
    if (mpp is not None and mpp <= 0) or (tile is not None and tile < 16):
        fail("--mpp must be > 0 and --tile at least 16")
    cfg = _config(config, overrides)
    settings = EvalConfig(
        seeds=seeds, tiles_per_class=tiles_per_class, tile=tile, mpp=mpp, background=background, device=device
    )
    try:
        pairs = parse_weights(weights or [], model)
        frame = load_manifest(manifest, cfg.storage)
        progress = lambda line: typer.echo(line, err=True)  # noqa: E731
        comparison = compare_models(frame, model, settings, pairs, cfg.storage, cfg.tissue, progress=progress)
    except (ProbeError, RegistryError, WeightsError, FileNotFoundError) as exc:
        fail(str(exc))
    files = write_comparison(comparison, out, cfg.storage)
    for row in comparison.results["models"]:
        if row["source"].get("random_init"):
            typer.echo(
                f"warning: {row['model']} has RANDOM weights (no --weights): for pipeline tests only",
                err=True,
            )
    typer.echo(comparison.markdown())
    for name, uri in files.items():
        typer.echo(f"{name + ':':16s} {uri}")


models_app = typer.Typer(
    no_args_is_help=True, help="Public pathology foundation models: the presets, and checks of their weights."
)
app.add_typer(models_app, name="models")


@models_app.command("list")
def models_list(
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """A table of the foundation presets: parameters (counted on the meta device), dim, pooling, tile,
    mpp and licence. Use one with `engine.preset: NAME` in a project config."""
    from pathray.models.foundation import count_parameters
    from pathray.models.presets import get_preset, preset_names

    rows = []
    for name in preset_names():
        p = get_preset(name)
        rows.append(
            {
                "name": name,
                "parameters": count_parameters(p),
                "dim": p.dim,
                "pooling": p.pooling,
                "tile": p.tile_size,
                "mpp": p.mpp,
                "licence": p.licence,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="foundation presets (engine.preset)")
    for column in ("name", "parameters", "dim", "pooling", "tile", "mpp", "licence"):
        numeric = column in ("parameters", "dim", "tile", "mpp")
        table.add_column(column, justify="right" if numeric else "left", no_wrap=column == "name")
    for row in rows:
        params = f"{row['parameters'] / 1e6:,.1f}M"
        cells = (row["name"], params, row["dim"], row["pooling"], row["tile"], row["mpp"], row["licence"])
        table.add_row(*map(str, cells))
    Console(width=None if sys.stdout.isatty() else 160).print(table)


@models_app.command("check")
def models_check(
    name: Annotated[str, typer.Argument(help="a preset: pathray models list")],
    weights: Annotated[
        str, typer.Option("--weights", "-w", help="a file, an HF folder or cache snapshot, hf-cache:org/name")
    ],
    allow_partial: Annotated[
        list[str] | None, typer.Option("--allow-partial", help="fnmatch pattern of keys that may be skipped")
    ] = None,
) -> None:
    """Load WEIGHTS into preset NAME strictly: print its parameters and dim (exit 0), or a line naming
    the keys that do not fit (exit 2)."""
    from pathray.models.foundation import load_foundation
    from pathray.models.weights import WeightsError
    from pathray.registry import RegistryError

    try:
        model = load_foundation(name, weights=weights, allow_partial=allow_partial or ())
    except (WeightsError, RegistryError) as exc:
        fail(str(exc))
    info = model.info
    typer.echo(
        f"{name}: ok, {info.params:,} parameters, dim {info.dim} ({info.pooling}), "
        f"tile {info.tile_size} px at {info.mpp} mpp, mean {list(info.mean)} std {list(info.std)}"
    )


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
