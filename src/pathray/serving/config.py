"""Typed config of the Serve application: HTTP, ingress, model deployment, stores and security."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, SecretStr, field_validator, model_validator

from pathray.inference.config import InferenceConfig
from pathray.section import Section
from pathray.storage import StorageConfig
from pathray.wsi.patching import TissueConfig


class HttpSection(Section):
    """Where Serve's HTTP proxy listens; 127.0.0.1 unless an operator opens it on purpose."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    app_name: str = Field("pathray", description="Serve application name")
    route_prefix: str = "/"


class AutoscalingSection(Section):
    """The model deployment's Serve ``autoscaling_config`` (replicas follow ongoing requests)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0, description="ongoing chunks per replica to aim at")
    upscale_delay_s: float = Field(10.0, ge=0)
    downscale_delay_s: float = Field(120.0, ge=0)
    look_back_period_s: float = Field(10.0, gt=0, description="window the ongoing-request average spans")
    metrics_interval_s: float = Field(2.0, gt=0, description="how often replicas report their load")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSection:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) < min_replicas ({self.min_replicas})")
        return self


class ModelDeploymentSection(Section):
    """Model replicas: resources, load bounds, multiplexing and tile batching."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    accelerator_type: str | None = Field(None, description="e.g. A100; None: any")
    max_ongoing_requests: int = Field(4, ge=1, description="chunks one replica works on at once")
    autoscaling: AutoscalingSection = Field(default_factory=AutoscalingSection)
    max_models_per_replica: int = Field(2, ge=1, description="multiplexed models kept loaded (LRU)")
    max_batch_tiles: int = Field(64, ge=1, description="@serve.batch: most tiles in one forward pass")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="@serve.batch: wait to fill a batch")
    torch_threads: int | None = Field(None, ge=1, description="torch threads per replica; None: num_cpus")

    def actor_options(self) -> dict[str, Any]:
        """Serve ``ray_actor_options``."""
        opts: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.accelerator_type:
            opts["accelerator_type"] = self.accelerator_type
        return opts

    def autoscaling_config(self) -> dict[str, Any]:
        """Serve ``autoscaling_config``."""
        return self.autoscaling.model_dump(exclude_none=True)


class IngressSection(Section):
    """The HTTP ingress: it plans slides, fans chunks out, stitches and writes results."""

    num_cpus: float = Field(0.5, ge=0, description="tissue masks and stitching run here")
    replicas: int = Field(1, ge=1, description="ingress replicas; status and files fall back to the store")
    max_ongoing_requests: int = Field(64, ge=1)
    max_concurrent_analyses: int = Field(4, ge=1, description="analyses running at once; others queue")
    inflight_chunks: int = Field(4, ge=1, description="chunks of one analysis in flight at once")
    max_pending_analyses: int = Field(256, ge=1, description="queued + running analyses; more get 429")
    keep_in_memory: int = Field(1024, ge=1, description="finished analyses kept in memory (the rest: store)")
    chunk_retries: int = Field(3, ge=0, description="retries of a chunk whose replica died")
    chunk_timeout_s: float = Field(900.0, gt=0, description="a chunk taking longer is retried elsewhere")
    retry_backoff_s: float = Field(0.5, ge=0)
    max_body_bytes: int = Field(16384, ge=256, description="larger request bodies get 413")
    status_interval_s: float = Field(2.0, gt=0, description="how often a running status.json is rewritten")
    stale_after_s: float = Field(
        60.0, gt=0, description="a stored running status this old belongs to a stopped ingress: failed"
    )


class SecuritySection(Section):
    """What a request may touch and who may make it."""

    allowed_prefixes: list[str] = Field(
        default_factory=list,
        description="slide URIs must lie under one of these (e.g. s3://slides/, file:///data/slides/)",
    )
    token: SecretStr | None = Field(
        None, exclude=True, description="bearer token (never written anywhere); None: read from token_env"
    )
    token_env: str = Field("PATHRAY_SERVE_TOKEN", description="environment variable holding the token")

    process_local = ("token",)  # replicas read token_env

    @field_validator("allowed_prefixes")
    @classmethod
    def _prefixes(cls, value: list[str]) -> list[str]:
        from pathray.serving.security import normalise_prefix

        return [normalise_prefix(p) for p in value]

    def export_env(self) -> None:
        """Put a token given in the config into ``token_env``, where the replicas of a local Ray
        started after this call read it."""
        if self.token is not None and self.token.get_secret_value():
            os.environ[self.token_env] = self.token.get_secret_value()

    def resolved_token(self) -> str | None:
        """The configured token, else the environment's; empty means no auth."""
        token = self.token.get_secret_value() if self.token else os.environ.get(self.token_env, "")
        return token or None


class ServeSection(Section):
    """The ``serve:`` section: stores, HTTP, deployments and security."""

    models: str = Field("models", description="model store: a folder or bucket prefix of model packages")
    output: str = Field("serve-out", description="where results go: <output>/<analysis id>/")
    http: HttpSection = Field(default_factory=HttpSection)
    ingress: IngressSection = Field(default_factory=IngressSection)
    model: ModelDeploymentSection = Field(default_factory=ModelDeploymentSection)
    security: SecuritySection = Field(default_factory=SecuritySection)


class ServeAppConfig(Section):
    """What ``build_app`` takes: the sections of a project config that serving reads."""

    storage: StorageConfig = Field(default_factory=StorageConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    inference: InferenceConfig = Field(default_factory=InferenceConfig)
    serve: ServeSection = Field(default_factory=ServeSection)
