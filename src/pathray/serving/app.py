"""``build_app``: the Serve application of pathray, typed and built on demand (nothing runs at import).

serve run configs/serve-app.yaml                  # Serve's own CLI, args from the YAML
pathray serve configs/serve.yaml --set serve.http.port=8100
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from pathray.serving.config import ServeAppConfig

if TYPE_CHECKING:
    from ray.serve import Application


class BuildArgs(BaseModel):
    """What ``serve run``'s ``args`` may hold: a config file, overrides, and/or inline sections."""

    model_config = ConfigDict(extra="allow")

    config: str | None = Field(None, description="a serve config YAML (configs/serve.yaml)")
    set: list[str] = Field(default_factory=list, description="overrides a.b=value, as on the CLI")


def _file_sections(path: str) -> dict[str, Any]:
    """The sections serving reads from a YAML file; a project config's other sections are allowed."""
    import yaml

    from pathray.config import ConfigError, PathrayConfig

    if not Path(path).is_file():
        raise ConfigError(f"no serve config file at {path}")
    loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, not {type(loaded).__name__}")
    ours = set(ServeAppConfig.model_fields)
    unknown = sorted(set(loaded) - ours - set(PathrayConfig.model_fields))
    if unknown:
        raise ConfigError(f"{path}: unknown sections {unknown}; serving reads {sorted(ours)}")
    return {k: v for k, v in loaded.items() if k in ours}


def load_app_config(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    """A ServeAppConfig from ``args``: inline sections win over the file, ``set`` wins over both.

    The file may be a serve config (configs/serve.yaml) or a whole project config with a
    ``serve:`` section; sections that serving does not read are left alone.
    """
    from pydantic import ValidationError

    from pathray.config import ConfigError, apply_override, interpolate_env
    from pathray.training.config import deep_merge

    if isinstance(args, ServeAppConfig):
        return args
    try:
        parsed = BuildArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"serve app args: {exc.errors()[0]['msg']}") from None
    tree = _file_sections(parsed.config) if parsed.config else {}
    tree = deep_merge(tree, parsed.model_extra or {})
    for override in parsed.set:
        apply_override(tree, override)
    try:
        return ServeAppConfig.model_validate(interpolate_env(tree))
    except ValidationError as exc:
        where = f"{parsed.config}: " if parsed.config else "serve app config: "
        lines = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(where + "; ".join(lines)) from None


def build_app(args: dict[str, Any] | ServeAppConfig | None = None) -> Application:
    """The ingress + model deployments, with resources, autoscaling and limits from config.

    Args:
        args: ``{"config": "configs/serve.yaml", "set": [...], <sections>...}`` (what ``serve run``
            passes) or a ready ServeAppConfig.
    """
    from pathray.serving.ingress import Ingress
    from pathray.serving.model import ModelServer

    cfg = load_app_config(args)
    model, ingress = cfg.serve.model, cfg.serve.ingress
    model_deployment = ModelServer.options(
        ray_actor_options=model.actor_options(),
        autoscaling_config=model.autoscaling_config(),
        max_ongoing_requests=model.max_ongoing_requests,
    )
    ingress_deployment = Ingress.options(
        ray_actor_options={"num_cpus": ingress.num_cpus},
        max_ongoing_requests=ingress.max_ongoing_requests,
        num_replicas=ingress.replicas,
    )
    # Only whether a token is on travels in the deployment's arguments; the replica reads the token
    # itself (config or environment), so it is not stored with the application.
    needs_token = cfg.serve.security.resolved_token() is not None
    return ingress_deployment.bind(model_deployment.bind(cfg), cfg, needs_token)
