"""Typed config: defaults < YAML < --set, ${ENV:-default}, clear errors for wrong keys."""

from __future__ import annotations

import pytest

from pathray.config import ConfigError, PathrayConfig, apply_override, dump_config, load_config


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
    assert cfg.storage.endpoint_url == "http://127.0.0.1:1" and cfg.storage.key == "k"
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
