"""Typed config: defaults < YAML < --set, ${ENV:-default}, clear errors for wrong keys."""

from __future__ import annotations

import pytest

from pathray.config import PathrayConfig, dump_config, load_config
from pathray.section import ConfigError, apply_override


def test_defaults():
    cfg = load_config()
    assert isinstance(cfg, PathrayConfig)
    assert cfg.tissue.mpp == 8.0 and cfg.storage.endpoint_url is None


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tissue:\n  mpp: 12\nstorage:\n  endpoint_url: http://127.0.0.1:9000\n")
    cfg = load_config(path, ["tissue.mpp=16", "storage.anon=true"])
    assert cfg.tissue.mpp == 16.0
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.storage.anon is True


def test_env_interpolation(tmp_path, monkeypatch):
    path = tmp_path / "c.yaml"
    path.write_text(
        "storage:\n  endpoint_url: ${PR_TEST_ENDPOINT:-http://127.0.0.1:1}\n  key: ${PR_TEST_KEY}\n"
    )
    monkeypatch.setenv("PR_TEST_KEY", "k")
    cfg = load_config(path)
    assert cfg.storage.endpoint_url == "http://127.0.0.1:1" and cfg.storage.key.get_secret_value() == "k"
    monkeypatch.setenv("PR_TEST_ENDPOINT", "http://127.0.0.1:2")
    assert load_config(path).storage.endpoint_url == "http://127.0.0.1:2"
    monkeypatch.delenv("PR_TEST_KEY")
    with pytest.raises(ConfigError, match="PR_TEST_KEY is not set"):
        load_config(path)


def test_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tissue:\n  mmp: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "tissue.mmp" in str(info.value) and str(path) in str(info.value)


def test_bad_override():
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "tissue.mpp")
    with pytest.raises(ConfigError, match="is not a section"):
        apply_override({"a": 1}, "a.b=2")


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["tissue.mpp=10"])
    path = tmp_path / "resolved.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


def test_the_task_section_is_validated_by_the_task_it_names():
    cfg = load_config(None, ["task.name=detection", "task.classes=[a, b]", "task.max_points=8"])
    assert type(cfg.task).__name__ == "DetectionConfig" and cfg.task.classes == ["a", "b"]
    assert cfg.task_spec().point_classes == ["a", "b"]
    with pytest.raises(ConfigError, match=r"task: .*dice_weight: Extra inputs are not permitted"):
        load_config(None, ["task.name=detection", "task.dice_weight=1"])  # a segmentation field
    with pytest.raises(ConfigError, match="unknown task 'segmentaton'; known: classification, detection"):
        load_config(None, ["task.name=segmentaton"])
    again = load_config(None, ["task.name=instance", "task.source=detections"])
    assert PathrayConfig.model_validate(again.model_dump()).task == again.task  # dumps keep the task


def test_classes_are_named_once_in_the_task_not_in_the_stream():
    with pytest.raises(ConfigError, match="data.stream.target is gone"):
        load_config(None, ["data.stream.target.task=segmentation"])


def test_engine_defaults_come_with_the_engine_and_the_project_wins(tmp_path):
    cnn = load_config(None, ["engine.name=cnn"])
    assert (cnn.data.stream.sampler.size, cnn.optim.lr, cnn.train.batch_size) == (256, 1e-3, 16)
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  name: cnn\noptim:\n  lr: 0.5\n")
    assert load_config(path).optim.lr == 0.5 and load_config(path).train.batch_size == 16
    with pytest.raises(ConfigError, match="unknown engine 'vit'; known: cnn, debug_cnn, debug_vit"):
        load_config(None, ["engine.name=vit"])


def test_the_vit_input_size_is_the_tile_the_model_sees():
    assert load_config(None, ["data.stream.sampler.size=96"]).engine.img_size == 96
    ssl = ["task.name=ssl", "data.stream.sampler.size=256", "data.stream.augment.global_size=160"]
    assert load_config(None, ssl).engine.img_size == 160  # a global crop, not the tile
    assert load_config(None, ["engine.img_size=112"]).engine.img_size == 112  # set: kept


def test_the_root_sections_are_named_where_every_part_sees_them():
    from pathray.section import ROOT_SECTIONS

    assert set(ROOT_SECTIONS) == set(PathrayConfig.model_fields)


def test_one_loader_for_project_and_serve_configs(tmp_path):
    from pathray.serving.config import ServeAppConfig

    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  name: cnn\nserve:\n  models: /m\ninference:\n  batch_size: 7\n")
    serve = load_config(path, ["inference.overlap=0.25"], model=ServeAppConfig)
    assert serve.serve.models == "/m" and serve.inference.batch_size == 7 and serve.inference.overlap == 0.25
    assert load_config(path, ["inference.batch_size=9"]).inference.batch_size == 9
    path.write_text("serv:\n  models: /m\n")
    with pytest.raises(ConfigError, match="serv: Extra inputs are not permitted"):
        load_config(path, model=ServeAppConfig)


def test_local_engine_weights_are_made_absolute_and_missing_ones_named(tmp_path, monkeypatch):
    """A relative engine.weights works from a Ray worker's folder too; a missing one fails up front."""
    from pathray.models.config import EngineConfig

    (tmp_path / "runs" / "ssl" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    engine = EngineConfig(weights="runs/ssl/model").with_local_weights()
    assert engine.weights == str(tmp_path / "runs" / "ssl" / "model")
    for kept in ("hf-cache:MahmoodLab/UNI", "s3://bucket/w.safetensors", None):
        assert EngineConfig(weights=kept).with_local_weights().weights == kept
    with pytest.raises(ValueError, match="runs/nope.pt"):
        EngineConfig(weights="runs/nope.pt").with_local_weights()
