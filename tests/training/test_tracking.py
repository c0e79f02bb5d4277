"""MLflow tracking of real runs (a local SQLite store, read back with MlflowClient), and the local Ray
dashboard that `--dashboard` starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.slow]


def assert_store_holds_no_secret(folder: Path, check: Any, key: str, secret: str) -> int:
    """Neither credential in any file MLflow wrote (its database, binaries included), and the text
    artifacts pass ``assert_no_secrets`` (no signature either); the number of files looked at."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    leaked = [p for p in files if key.encode() in p.read_bytes() or secret.encode() in p.read_bytes()]
    assert not leaked, leaked
    check(*[p.read_text() for p in files if p.suffix in (".yaml", ".json", ".jsonl")])
    return len(files)


@pytest.mark.ray
def test_a_tracked_run_is_in_mlflow_with_its_params_curves_metrics_and_model(
    ray_local, project, object_store, assert_no_secrets, tmp_path
):
    from mlflow import MlflowClient

    from pathray.models.package import read_model_package
    from pathray.storage import StorageConfig
    from pathray.training.trainer import run_training

    cfg = project(
        "tracked",
        "scale.workers=1",
        "scale.cpus_per_worker=1",
        "train.steps=4",
        "run.log_every=1",
        "run.checkpoint_every=4",
        "train.eval_mode=tiles",
        "train.batch_size=4",
        "data.stream.sampler.tiles_per_slide=16",
        "train.eval_tiles_per_slide=8",
        "tracking.mlflow=true",
    )
    # Credentials as a user writing storage.key/secret gives them: they must reach no param,
    # tag, metric or artifact (the run itself is local and never uses them).
    key, secret = object_store.credentials()
    cfg.storage = StorageConfig(key=key, secret=secret)
    result = run_training(cfg)

    uri, run_id = result.paths["mlflow_run"].split("#")
    store = tmp_path / "runs" / "mlruns"
    assert uri == f"sqlite:///{store / 'mlflow.db'}"  # the default store: beside the runs
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client.get_experiment(run.info.experiment_id).name == "pathray"
    params = run.data.params
    assert params["engine.name"] == "debug_cnn" and params["task.name"] == "segmentation"
    assert params["train.steps"] == "4" and params["tracking.mlflow"] == "true"
    assert json.loads(params["task.classes"]) == cfg.task.classes
    assert not [name for name in params if name.startswith("storage.") and name[8:] in ("key", "secret")]
    # the final test metric, as the run reports it
    assert run.data.metrics["test/macro_f1"] == pytest.approx(result.metrics["test/macro_f1"])
    assert run.data.metrics["baseline/macro_f1"] == pytest.approx(result.metrics["baseline/macro_f1"])
    # the loss curve: one point per history row, at the row's step
    rows = [json.loads(line) for line in Path(result.paths["history"]).read_text().splitlines()]
    losses = [(row["step"], row["loss"]) for row in rows if "loss" in row]
    assert [step for step, _ in losses] == [1, 2, 3, 4]
    curve = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert curve == [(step, pytest.approx(loss)) for step, loss in losses]
    assert [m.step for m in client.get_metric_history(run_id, "lr")] == [1, 2, 3, 4]
    # the run's files and its model package, which loads as a server would load it
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "history.jsonl", "metrics.json", "curves.png", "model"} <= names, names
    model = Path(client.download_artifacts(run_id, "model", str(tmp_path / "download")))
    package = read_model_package(str(model))
    assert package.meta["step"] == 4 and package.config.task.classes == cfg.task.classes
    # no credential in the database, nor in any artifact
    assert_no_secrets(json.dumps(params), json.dumps(run.data.tags))
    assert assert_store_holds_no_secret(store, assert_no_secrets, key, secret) >= 7  # db + 6 artifacts


@pytest.mark.s3
@pytest.mark.parametrize("given", [False, True], ids=["default-store", "given-uri"])
def test_a_run_on_object_storage_is_tracked_locally_with_its_files_copied(
    object_store, assert_no_secrets, tmp_path, monkeypatch, given
):
    """A run whose outputs are in a bucket: by default the store is ./mlruns (a database cannot live
    in a bucket), or the given URI; the outputs are copied into it, credentials are not."""
    from mlflow import MlflowClient

    from pathray.storage import StorageConfig, write_text
    from pathray.training.config import ProjectConfig
    from pathray.training.tracking import track_run

    monkeypatch.chdir(tmp_path)
    prefix = object_store.url_for(f"tracked-runs/{tmp_path.name}")
    key, secret = object_store.credentials()
    key_env, secret_env = object_store.env_names()
    storage = StorageConfig(
        endpoint_url=object_store.endpoint_url, key=key, secret=secret, key_env=key_env, secret_env=secret_env
    )
    paths = {
        "model": f"{prefix}/r1/model",
        "metrics": write_text(f"{prefix}/r1/metrics.json", '{"test/f1": 0.5}', storage),
    }
    write_text(f"{paths['model']}/model.yaml", "format: 1\n", storage)
    write_text(f"{paths['model']}/weights.safetensors", "weights", storage)
    given_uri = f"sqlite:///{tmp_path / 'given' / 'mlflow.db'}"
    (tmp_path / "given").mkdir()
    tracking = {"mlflow": True, "experiment": "remote", **({"uri": given_uri} if given else {})}
    cfg = ProjectConfig(run={"name": "r1", "storage_path": prefix, "log_every": 1}, tracking=tracking)
    cfg.storage = storage
    history = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}]
    out = track_run(cfg, history, {"loss": 1.0, "test/f1": 0.5}, paths)

    uri, run_id = out["mlflow_run"].split("#")
    assert uri == (given_uri if given else f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.data.tags["pathray.run_dir"] == f"{prefix}/r1"
    assert run.data.metrics == {"loss": 1.0, "test/f1": 0.5}  # loss: the curve's last point, once
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.0), (2, 1.0)]
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {
        "model/model.yaml",
        "model/weights.safetensors",
    }
    copied = Path(client.download_artifacts(run_id, "metrics.json", str(tmp_path / "download")))
    assert json.loads(copied.read_text()) == {"test/f1": 0.5}
    assert_no_secrets(json.dumps(run.data.params), json.dumps(run.data.tags))
    assert assert_store_holds_no_secret(tmp_path, assert_no_secrets, key, secret) >= 4


def test_tracking_without_mlflow_installed_fails_before_training_with_the_extra_to_install(tmp_path):
    # Python's own way to make an installed package unimportable in one process: None in sys.modules.
    code = (
        "import sys; sys.modules['mlflow'] = None; from pathray.cli import main; "
        f"sys.argv = ['pathray', 'train', {str(tmp_path / 'none.yaml')!r}, '--set', 'tracking.mlflow=true']; "
        "main()"
    )
    (tmp_path / "none.yaml").write_text("engine:\n  name: debug_cnn\n  model: null\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: tracking.mlflow is on, but mlflow is not installed: pip install 'pathray[tracking]'"
    ]


DASHBOARD = """
import sys
from pathray.cli import _start_ray
from pathray.storage import StorageConfig

_start_ray(StorageConfig(), dashboard=True)
print("ready", file=sys.stderr, flush=True)
sys.stdin.read()  # until the test is done with it
"""


@pytest.mark.ray
def test_dashboard_serves_http_on_127_0_0_1_and_the_url_is_printed(own_tmp, own_pids):
    import psutil

    env = {**os.environ, "TMPDIR": own_tmp, "RAY_TMPDIR": own_tmp}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-c", DASHBOARD],
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        started, lines = time.perf_counter(), []
        for line in proc.stderr:  # Ray's own log lines come first
            lines.append(line)
            if line.startswith("ready") or time.perf_counter() - started > 120:
                break
        seconds = time.perf_counter() - started
        shown = [line for line in lines if line.startswith("Ray dashboard: ")]
        assert len(shown) == 1, "".join(lines)
        url = shown[0].split()[2]
        assert url.startswith("http://127.0.0.1:"), shown
        assert "ray get-auth-token" in shown[0]  # Ray's token auth is on: the API needs the token
        with urllib.request.urlopen(url, timeout=30) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{url}/api/version", timeout=30)
        assert refused.value.code == 401
        token = subprocess.run(
            [str(Path(sys.executable).parent / "ray"), "get-auth-token"],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
        ).stdout.strip()
        request = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(request, timeout=30) as api:
            assert api.status == 200 and "ray_version" in json.loads(api.read())
        port = int(url.rsplit(":", 1)[1])
        listening = {
            c.laddr.ip
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port
        }
        assert listening == {"127.0.0.1"}, listening
        print(f"local Ray with its dashboard up in {seconds:.1f} s")
    finally:
        proc.stdin.close()
        proc.wait(timeout=120)
    for _ in range(60):  # Ray's processes end shortly after their driver
        if not own_pids():
            break
        time.sleep(1)
    assert not own_pids(), f"left behind: {own_pids()}"
