"""Model packages are YAML + safetensors: they rebuild the model exactly, and loading one never unpickles."""

from __future__ import annotations

import pickle

import pytest
import torch
import yaml

from pathray.models.package import CONFIG_FILE, WEIGHTS_FILE, read_model_package, read_package_config


class Payload:
    """What a hostile model store could hold: unpickling it runs code (it writes a marker file)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: D105
        return (open, (self.marker, "w"))


def test_a_package_is_yaml_and_safetensors_and_rebuilds_the_model(tmp_path, save_package):
    from pathray.models.config import EngineConfig
    from pathray.models.package import package_model, save_model_package
    from pathray.models.task_model import build_model
    from pathray.models.tasks import DetectionConfig

    torch.manual_seed(0)
    engine = EngineConfig(name="debug_vit", img_size=64)
    task = DetectionConfig(classes=["a", "b"])
    model, _ = build_model(engine, task)
    model.engine.set_normalization((0.7, 0.6, 0.5), (0.2, 0.25, 0.3))  # not timm's: must travel
    uri = save_model_package(str(tmp_path / "pkg"), package_model(model, engine, task, 64, 2.0, {"run": "r"}))
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE])
    doc = yaml.safe_load((tmp_path / "pkg" / CONFIG_FILE).read_text())
    assert doc["task"] == {**task.model_dump(), "name": "detection"} and "storage" not in doc
    assert doc["input"] == {"tile_size": 64, "mpp": 2.0} and doc["meta"]["run"] == "r"
    assert doc["normalisation"]["mean"] == pytest.approx([0.7, 0.6, 0.5])

    rebuilt, spec = read_model_package(uri).build()
    assert spec.point_classes == ["a", "b"] and read_package_config(uri).engine.name == "debug_vit"
    tiles = torch.randint(0, 256, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(rebuilt(tiles), model.eval()(tiles))


def test_loading_never_unpickles(tmp_path, save_package):
    uri = save_package(tmp_path / "pkg")
    marker = tmp_path / "ran"
    (tmp_path / "pkg" / WEIGHTS_FILE).write_bytes(pickle.dumps(Payload(str(marker))))
    with pytest.raises(Exception) as info:
        read_model_package(uri)
    assert not marker.exists(), "a pickle in the model store was executed"
    assert "header" in str(info.value).lower() or "safetensor" in str(info.value).lower()

    # a folder of the old layout (a pickled model.pt beside config.yaml) is not a package at all
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.yaml").write_text("task: {name: segmentation}\n")
    torch.save({"model": Payload(str(marker))}, old / "model.pt")
    with pytest.raises(FileNotFoundError, match="is not a model package"):
        read_model_package(str(old))
    assert not marker.exists()


def test_weights_that_do_not_fit_the_config_fail_loudly(tmp_path, save_package):
    uri = save_package(tmp_path / "pkg")
    config = (tmp_path / "pkg" / CONFIG_FILE).read_text()
    (tmp_path / "pkg" / CONFIG_FILE).write_text(config.replace("debug_cnn", "debug_vit"))
    with pytest.raises(RuntimeError, match="state_dict"):
        read_model_package(uri).build()


def test_a_package_as_engine_weights_brings_its_backbone(tmp_path, save_package, monkeypatch):
    """An SSL run's exported teacher, a ViT with registers and LayerScale, fine-tunes from a project
    that names neither (as configs/gleason-foundation.yaml after configs/dinov2-pretrain.yaml): the
    package's architecture and normalisation come with its weights, at the project's own input
    size; a project that names another architecture is told which one the weights fit."""
    from pathray.models.config import EngineConfig
    from pathray.models.engines import build_engine
    from pathray.models.package import with_package_backbone

    arch = ["engine.name=debug_vit", "engine.model_kwargs={reg_tokens: 4, init_values: 1.0e-5}"]
    uri = save_package(tmp_path / "ssl" / "model", *arch, "engine.img_size=64", "data.stream.sampler.size=64")
    package = read_model_package(uri)
    monkeypatch.chdir(tmp_path)
    engine = with_package_backbone(
        EngineConfig(name="debug_vit", img_size=96, weights="ssl/model").with_local_weights()
    )
    assert engine.weights == str(tmp_path / "ssl" / "model" / WEIGHTS_FILE)
    assert engine.model_kwargs == {"reg_tokens": 4, "init_values": 1.0e-5}
    assert engine.mean == tuple(package.config.normalisation.mean)
    for config in (engine, with_package_backbone(EngineConfig(name="debug_vit", img_size=96, weights=uri))):
        built = build_engine(config)  # strictly loaded: registers, LayerScale, pos_embed resampled
        assert built.num_prefix_tokens == 5
        for key, value in built.backbone.state_dict().items():
            if key != "pos_embed":
                assert torch.equal(value, package.state[f"engine.backbone.{key}"]), key
        with torch.no_grad():
            pooled, dense = built(built.normalize(torch.zeros(2, 96, 96, 3, dtype=torch.uint8)))
        assert pooled.shape == (2, built.embed_dim) and dense.shape[-1] == 96 // built.dense_stride
    with pytest.raises(ValueError, match="engine.model 'vit_small_patch16_224' contradicts the model"):
        with_package_backbone(EngineConfig(name="debug_vit", model="vit_small_patch16_224", weights=uri))
    with pytest.raises(ValueError, match="engine.name 'foundation' contradicts"):
        with_package_backbone(EngineConfig(name="foundation", weights="ssl/model").with_local_weights())
