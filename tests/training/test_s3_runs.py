"""A training run whose storage is a bucket (SeaweedFS on 127.0.0.1): checkpoints via Ray's pyarrow
filesystem, outputs and the model package via fsspec, both from the project's StorageConfig; the
credentials it was given reach no file it leaves behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_arrow_storage_reaches_the_endpoint_of_the_storage_config(object_store, s3_storage):
    from pyarrow import fs as pafs

    from pathray.storage import arrow_filesystem

    path, arrow = arrow_filesystem(object_store.url_for("arrow-probe/"), s3_storage)
    assert path == f"{object_store.bucket}/arrow-probe"
    with arrow.open_output_stream(f"{path}/hello.txt") as out:
        out.write(b"hello")
    with arrow.open_input_stream(f"{path}/hello.txt") as src:
        assert src.read() == b"hello"
    assert arrow.get_file_info(f"{path}/hello.txt").type == pafs.FileType.File
    assert arrow_filesystem("runs") == (str(__import__("pathlib").Path("runs").absolute()), None)


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_object_storage_keeps_everything_in_the_bucket_and_no_credential_anywhere(
    ray_local, project, object_store, s3_storage, tmp_path, monkeypatch
):
    import io

    import ray
    import torch
    import yaml

    from pathray.config import PathrayConfig
    from pathray.models.package import read_model_package
    from pathray.storage import StorageConfig, filesystem, parse_uri
    from pathray.training.trainer import latest_state, run_training

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    prefix = object_store.url_for(f"runs/{tmp_path.name}")
    # The driver is given the credentials themselves, as a user writing storage.key/secret would;
    # the workers find them in the environment variables the config names (as on a cluster).
    key, secret = object_store.credentials()
    key_env, secret_env = object_store.env_names()
    storage = StorageConfig(
        endpoint_url=object_store.endpoint_url, key=key, secret=secret, key_env=key_env, secret_env=secret_env
    )
    cfg = project(
        "s3run",
        "scale.workers=1",
        "scale.cpus_per_worker=1",
        "train.steps=4",
        "run.checkpoint_every=2",
        "run.log_every=2",
        f"run.storage_path={prefix}",
    ).model_copy(update={"storage": storage})
    result = run_training(cfg)

    run_dir = f"{prefix}/s3run"
    assert result.run_dir == run_dir
    assert result.checkpoint.startswith(f"{run_dir}/checkpoint_"), result.checkpoint
    fs = filesystem(parse_uri(run_dir), s3_storage)
    bucket_dir = parse_uri(run_dir).path
    for name in ("config.yaml", "history.jsonl", "metrics.json", "curves.png", "model/weights.safetensors"):
        assert fs.size(f"{bucket_dir}/{name}") > 0, name
    assert fs.cat_file(f"{bucket_dir}/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    history = [json.loads(line) for line in fs.cat_file(f"{bucket_dir}/history.jsonl").splitlines()]
    assert [row["step"] for row in history if "loss" in row] == [2, 4]
    metrics = json.loads(fs.cat_file(f"{bucket_dir}/metrics.json"))
    assert "test/macro_f1" in metrics and metrics["steps"] == 4
    config = PathrayConfig.model_validate(yaml.safe_load(fs.cat_file(f"{bucket_dir}/config.yaml")))
    assert config.run.storage_path == prefix and config.run.name == "s3run"

    # Ray's checkpoint and pathray's view of it: the newest state, read back through fsspec
    assert latest_state(run_dir, s3_storage)["step"] == 4
    checkpoint = parse_uri(result.checkpoint).path
    saved = torch.load(io.BytesIO(fs.cat_file(f"{checkpoint}/checkpoint.pt")), weights_only=True)
    assert saved["step"] == 4

    # the exported package, read from the bucket, holds the checkpoint's weights
    package = read_model_package(result.paths["model"], s3_storage)
    assert result.paths["model"] == f"{run_dir}/model" and package.meta["step"] == 4
    assert package.state.keys() == saved["model"].keys()
    assert all(torch.equal(package.state[k], saved["model"][k]) for k in package.state)
    package.build()
    assert list(tmp_path.iterdir()) == [], "nothing of the run was written to local disk"

    # Neither the key nor the secret is in any file of the run (config, history, metrics, curves,
    # checkpoints, model package, digests) nor in any log of the Ray session the run was in.
    files = {f"s3://{path}": fs.cat_file(path) for path in fs.find(bucket_dir)}
    assert any("checkpoint_" in name for name in files) and any("model.yaml" in name for name in files)
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    files.update({str(p): p.read_bytes() for p in session.rglob("*") if p.is_file() and not p.is_symlink()})
    assert any("/logs/" in name for name in files)
    leaked = [name for name, data in files.items() if key.encode() in data or secret.encode() in data]
    assert leaked == [], leaked
