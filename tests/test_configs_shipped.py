"""Every YAML file shipped in configs/ loads into the typed config it is for.

Project configs load as ``PathrayConfig``; serve configs (a ``serve:`` section) load as the Serve
app's ``ServeAppConfig``; Serve deploy files (``applications:``) pass Ray's own schema, and the
args of each pathray application pass ``ServeAppConfig``; experiment files build every cell.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pathray.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def kind(path: Path) -> str:
    tree = yaml.safe_load(path.read_text()) or {}
    if "experiment" in tree:
        return "experiment"
    return "deploy" if "applications" in tree else "serve" if "serve" in tree else "project"


def test_there_are_configs():
    assert {kind(p) for p in CONFIGS} == {"project", "serve", "deploy", "experiment"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads(path, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    if kind(path) == "project":
        assert load_config(path).model_dump()
        return
    if kind(path) == "experiment":
        from pathray.training.experiment import ExperimentConfig, cell_config

        exp = load_config(path, model=ExperimentConfig).experiment
        exp = exp.model_copy(update={"base": str(path.parent / exp.base)})
        for engine in exp.engines:  # every cell's project config loads too
            cfg = cell_config(exp, Path("/tmp"), engine, exp.fractions[0], exp.workers[0])
            assert cfg.engine.name == engine and cfg.data.fraction == exp.fractions[0]
        return
    from pathray.serving.app import load_app_config

    if kind(path) == "serve":
        assert load_app_config({"config": str(path)}).serve.model.autoscaling.max_replicas >= 1
        return
    from ray.serve.schema import ServeDeploySchema

    deploy = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    apps = [a for a in deploy.applications if a.import_path == "pathray.serving.app:build_app"]
    assert apps, f"{path.name} deploys no pathray application"
    for app in apps:
        assert load_app_config(app.args).serve.models
