"""``build_app``: the Serve application of pathray, typed and built on demand (nothing runs at import).

serve run configs/serve-app.yaml                  # Serve's own CLI, args from the YAML
pathray serve configs/serve.yaml --set serve.http.port=8100
"""

from __future__ import annotations

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


def load_app_config(args: dict[str, Any] | ServeAppConfig | None) -> ServeAppConfig:
    """A ServeAppConfig from ``args``: inline sections win over the file, ``set`` wins over both.

    The file may be a serve config (configs/serve.yaml) or a whole project config with a ``serve:``
    section; the root's sections that serving does not read are left alone.
    """
    from pydantic import ValidationError

    from pathray.section import ROOT_SECTIONS, ConfigError, load_section

    if isinstance(args, ServeAppConfig):
        return args
    try:
        parsed = BuildArgs.model_validate(args or {})
    except ValidationError as exc:
        raise ConfigError(f"serve app args: {exc.errors()[0]['msg']}") from None
    return load_section(ServeAppConfig, parsed.config, parsed.set, parsed.model_extra, ignore=ROOT_SECTIONS)


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
