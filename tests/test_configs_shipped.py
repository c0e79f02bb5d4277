"""Every YAML file shipped in configs/ loads into the typed config tree."""

from __future__ import annotations

from pathlib import Path

import pytest

from pathray.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    cfg = load_config(path)
    assert cfg.model_dump()
