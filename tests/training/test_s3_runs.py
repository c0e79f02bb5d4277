"""A training run whose storage is a bucket (SeaweedFS on 127.0.0.1): checkpoints via Ray's pyarrow
filesystem, outputs and the model package via fsspec, both from the project's StorageConfig."""

from __future__ import annotations

import json

import pytest


def test_arrow_storage_reaches_the_endpoint_of_the_storage_config(object_store, s3_storage):
    from pyarrow import fs as pafs

    from pathray.training.rundir import arrow_storage

    path, arrow = arrow_storage(object_store.url_for("arrow-probe/"), s3_storage)
    assert path == f"{object_store.bucket}/arrow-probe"
    with arrow.open_output_stream(f"{path}/hello.txt") as out:
        out.write(b"hello")
    with arrow.open_input_stream(f"{path}/hello.txt") as src:
        assert src.read() == b"hello"
    assert arrow.get_file_info(f"{path}/hello.txt").type == pafs.FileType.File
    assert arrow_storage("runs") == (str(__import__("pathlib").Path("runs").absolute()), None)


@pytest.mark.ray
@pytest.mark.slow
def test_a_run_on_object_storage_keeps_everything_in_the_bucket(
    ray_local, project, object_store, s3_storage, tmp_path, monkeypatch
):
    import io

    import torch
    import yaml

    from pathray.config import PathrayConfig
    from pathray.models.package import read_model_package
    from pathray.training.trainer import latest_state, run_training
    from pathray.wsi.storage import filesystem, parse_uri

    monkeypatch.chdir(tmp_path)  # anything written locally by mistake would land here
    prefix = object_store.url_for(f"runs/{tmp_path.name}")
    cfg = project(
        "s3run",
        "scale.workers=1",
        "scale.cpus_per_worker=1",
        "train.steps=4",
        "run.checkpoint_every=2",
        "run.log_every=2",
        f"run.storage_path={prefix}",
    ).model_copy(update={"storage": s3_storage})
    result = run_training(cfg)

    run_dir = f"{prefix}/s3run"
    assert result.run_dir == run_dir
    assert result.checkpoint.startswith(f"{run_dir}/checkpoint_"), result.checkpoint
    fs = filesystem(parse_uri(run_dir), s3_storage)
    bucket_dir = parse_uri(run_dir).path
    for name in ("config.yaml", "history.jsonl", "metrics.json", "curves.png", "model/model.pt"):
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
    saved = torch.load(io.BytesIO(fs.cat_file(f"{checkpoint}/checkpoint.pt")), weights_only=False)
    assert saved["step"] == 4

    # the exported package, read from the bucket, holds the checkpoint's weights
    package = read_model_package(result.paths["model"], s3_storage)
    assert result.paths["model"] == f"{run_dir}/model" and package.meta["step"] == 4
    assert package.state.keys() == saved["model"].keys()
    assert all(torch.equal(package.state[k], saved["model"][k]) for k in package.state)
    package.build()
    assert list(tmp_path.iterdir()) == [], "nothing of the run was written to local disk"
