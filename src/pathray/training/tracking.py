"""Optional experiment tracking (MLflow): params, metrics, curves and the model package of a run.

pathray train configs/gleason-cnn.yaml --set tracking.mlflow=true             # store beside the runs
pathray train configs/gleason-cnn.yaml --set tracking.mlflow=true --set tracking.uri=http://mlflow:5000
mlflow ui --backend-store-uri sqlite:///runs/mlruns/mlflow.db    # the local store (full `mlflow` package)

Needs ``pip install 'pathray[tracking]'``. The run directory stays the record of a run; MLflow gets
a copy to compare runs by: the resolved config as params (never storage credentials, which a
config dump leaves out), every history row's numbers as curves at their step, the final metrics,
and the run's files with its model package as artifacts.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import Field

from pathray.section import ConfigError, Section
from pathray.storage import StorageConfig, call, is_remote, join_uri, parse_uri, read_bytes, redact

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'pathray[tracking]'"
LOCAL_STORE = "mlruns"  # the folder of the default store: mlflow.db and artifacts/
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
BATCH = 100  # MLflow takes at most 100 params (1000 metrics) per log_batch


class TrackingConfig(Section):
    """Where a run is tracked besides its own run directory (nothing by default)."""

    mlflow: bool = Field(False, description="record the run in MLflow (pip install 'pathray[tracking]')")
    uri: str | None = Field(
        None,
        description="MLflow tracking URI (sqlite:///path/mlflow.db, http://host:5000, databricks, ...); "
        "null: a local store <run.storage_path>/mlruns (./mlruns when the runs are on object storage)",
    )
    experiment: str = Field("pathray", description="MLflow experiment name")


def check_tracking(tracking: TrackingConfig) -> None:
    """Fail before training, not after it, when tracking is on but MLflow (or, for the default local
    store, its database packages) is missing. Imports nothing."""
    if not tracking.mlflow:
        return
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if tracking.uri is None else [])
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        verb = "is" if len(missing) == 1 else "are"
        raise ConfigError(
            f"tracking.mlflow is on, but {', '.join(missing)} {verb} not installed: {INSTALL_HINT}"
        )


def local_store(storage_path: str) -> Path:
    """The default store's folder: ``mlruns`` beside the runs, or in the working directory when the
    runs are on object storage (an MLflow database cannot live in a bucket)."""
    if is_remote(storage_path):
        return Path(LOCAL_STORE).absolute()
    return Path(parse_uri(storage_path).path) / LOCAL_STORE


def store_uris(tracking: TrackingConfig, storage_path: str) -> tuple[str, str | None]:
    """The tracking URI and, for the default local store, where its artifacts go (a SQLite database and
    an artifacts folder side by side: MLflow 3 keeps its plain-folder store in maintenance mode)."""
    if tracking.uri is not None:
        return tracking.uri, None
    folder = local_store(storage_path)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


def import_mlflow() -> Any:
    """The ``mlflow`` module, with its usage telemetry off (runs make no network calls of their own);
    a missing install is a one-line error."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        import mlflow
    except ImportError:
        raise ConfigError(f"tracking.mlflow is on, but MLflow is not installed: {INSTALL_HINT}") from None
    return mlflow


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested sections as ``a.b.c`` -> text params; lists and nulls as JSON, signed URLs redacted."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[re.sub(r"[^\w\-. :/]", "_", name)] = redact(text)[:MAX_PARAM_LENGTH]
    return out


def is_number(value: Any) -> bool:
    """Whether MLflow can take ``value`` as a metric (a flag is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def curve_points(history: list[dict[str, Any]], timestamp_ms: int) -> list[Any]:
    """Every number of every history row as an MLflow metric at the row's step."""
    from mlflow.entities import Metric

    return [
        Metric(key, float(value), timestamp_ms, int(row["step"]))
        for row in history
        if "step" in row
        for key, value in row.items()
        if key != "step" and is_number(value)
    ]


def final_points(metrics: dict[str, Any], curves: set[str], step: int, timestamp_ms: int) -> list[Any]:
    """The final metrics that are not already the last point of a curve (``loss`` is), at ``step``."""
    from mlflow.entities import Metric

    return [
        Metric(key, float(value), timestamp_ms, step)
        for key, value in metrics.items()
        if key not in curves and key != "step" and is_number(value)
    ]


def local_copy(uri: str, storage: StorageConfig | None, into: Path) -> Path:
    """A file or folder on this machine: ``uri`` itself when local, else a copy under ``into``."""
    location = parse_uri(uri)
    if location.is_local:
        return Path(location.path)
    root = location.path.rstrip("/")
    target = into / location.name
    for path in call(location, storage, "find", root):
        relative = path[len(root) :].lstrip("/")
        dest = target / relative if relative else target
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(f"{location.protocol}://{path}", storage))
    return target


def experiment_id(client: Any, name: str, artifacts: str | None) -> str:
    """The id of experiment ``name``, created on first use (a run started alongside may win the race)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return str(found.experiment_id)
    try:
        return str(client.create_experiment(name, artifact_location=artifacts))
    except Exception:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return str(found.experiment_id)


def log_artifacts(client: Any, run_id: str, paths: dict[str, str], storage: StorageConfig | None) -> None:
    """The run's files (config, history, metrics, curves) and folders (the model package) as artifacts;
    files on object storage are copied to a temporary folder first."""
    with tempfile.TemporaryDirectory(prefix="pathray-mlflow-") as tmp:
        for name, uri in paths.items():
            local = local_copy(uri, storage, Path(tmp) / name)
            if local.is_dir():
                client.log_artifacts(run_id, str(local), artifact_path=name)
            elif local.is_file():
                client.log_artifact(run_id, str(local))


def record_run(
    client: Any,
    run_id: str,
    cfg: Any,
    history: list[dict[str, Any]],
    metrics: dict[str, Any],
    paths: dict[str, str],
) -> None:
    """Params, curves, final metrics and artifacts of one run into an open MLflow run."""
    from mlflow.entities import Param

    # The resolved project as ``config.yaml`` holds it: credentials are excluded from every dump.
    config = cfg.model_dump(mode="json", include=set(type(cfg).model_fields))
    params = [Param(k, v) for k, v in flatten(config).items()]
    for i in range(0, len(params), BATCH):
        client.log_batch(run_id, params=params[i : i + BATCH])
    now = int(time.time() * 1000)
    curves = curve_points(history, now)
    points = curves + final_points(metrics, {m.key for m in curves}, int(cfg.train.steps), now)
    for i in range(0, len(points), 10 * BATCH):
        client.log_batch(run_id, metrics=points[i : i + 10 * BATCH])
    log_artifacts(client, run_id, paths, cfg.storage)


def track_run(
    cfg: Any, history: list[dict[str, Any]], metrics: dict[str, Any], paths: dict[str, str]
) -> dict[str, str]:
    """Record a finished run where ``cfg.tracking`` says; the paths it wrote (none when off).

    ``cfg`` is the run's resolved project config (``run.name`` and ``run.storage_path`` set);
    ``paths`` are the run's outputs by name (``model``: the package folder). Returns
    ``{"mlflow_run": "<tracking uri>#<run id>"}``; the MLflow run is marked FAILED when recording fails.
    """
    if not cfg.tracking.mlflow:
        return {}
    check_tracking(cfg.tracking)
    mlflow = import_mlflow()
    uri, artifacts = store_uris(cfg.tracking, cfg.run.storage_path)
    if cfg.tracking.uri is None and is_remote(cfg.run.storage_path):
        log.warning(
            "runs are on %s: MLflow records into %s (tracking.uri chooses)", cfg.run.storage_path, uri
        )
    client = mlflow.MlflowClient(tracking_uri=uri)
    tags = {
        "pathray.run_dir": redact(join_uri(cfg.run.storage_path, cfg.run.name)),
        "pathray.engine": cfg.engine.preset or cfg.engine.name,
        "pathray.task": cfg.task.name,
    }
    experiment = experiment_id(client, cfg.tracking.experiment, artifacts)
    run_id = client.create_run(experiment, run_name=cfg.run.name, tags=tags).info.run_id
    try:
        record_run(client, run_id, cfg, history, metrics, paths)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return {"mlflow_run": f"{uri}#{run_id}"}
