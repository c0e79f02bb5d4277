"""A frozen model that turns uint8 tiles into embeddings: a preset, a model package or a timm name.

    embedder = load_embedder("uni", weights="/models/uni/pytorch_model.bin")
    embedder = load_embedder("runs/dinov2/model")            # a package (an SSL run's export)
    embedder = load_embedder("vit_small_patch16_224")        # random weights: pipeline tests only
    vectors = embedder.embed(tiles)                          # (N, 224, 224, 3) uint8 -> (N, D) float16

The embedding is the engine's pooled output (the preset's pooling: CLS, or CLS + patch mean),
computed without the engine's dense decoder (``Engine.pooled``), in bf16 autocast on a GPU. Random
weights are seeded, so every process that builds the same random model gets the same one.
``source`` records the model and a digest of its weights as loaded (backbone and normalisation),
which every embedding file carries, so embeddings of two models are never mixed.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from pathray.inference.embeddings import EmbeddingSource
from pathray.storage import StorageConfig

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)


RANDOM_SEED = 0
"""Seed of random weights (a timm name or preset without weights): the same model in every actor."""


def weights_digest(module: nn.Module, *extra: object) -> str:
    """SHA-256 over the module's state dict (names, dtypes, shapes and bytes, in key order) and the
    ``repr`` of ``extra`` (what else changes the output: the normalisation)."""
    import torch

    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        # reshape(-1): a 0-d tensor (BatchNorm's step count) cannot be viewed as bytes as it is
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for value in extra:
        h.update(repr(value).encode())
    return h.hexdigest()


def _pooled_module() -> type:
    from torch import nn

    class PooledEmbedding(nn.Module):
        """uint8 ``(B, H, W, 3)`` tiles -> the engine's pooled ``(B, D)`` embedding, decoder skipped."""

        def __init__(self, engine: nn.Module) -> None:
            super().__init__()
            self.engine = engine

        def forward(self, images: torch.Tensor) -> torch.Tensor:
            return self.engine.pooled(self.engine.normalize(images))

    return PooledEmbedding


@dataclass
class TileEmbedder:
    """A task model whose output is the pooled embedding, on its device, in eval mode.

    Attributes:
        model: uint8 ``(B, H, W, 3)`` tiles -> ``(B, D)`` embeddings (normalisation inside; the
            engine's ``pooled``, which skips its dense decoder).
        source: the model's name, weights digest, dimension and preset facts.
        tile_size: tile edge (px) the model expects; mpp: µm/px of those tiles.
    """

    model: nn.Module
    source: EmbeddingSource
    tile_size: int
    mpp: float
    device: torch.device
    dtype: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return self.source.embed_dim

    def forward(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, D)`` embeddings on the device (no copy back): what a GPU worker keeps busy with."""
        import torch

        x = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(images))
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        with (
            torch.inference_mode(),
            torch.autocast(
                self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
            ),
        ):
            return self.model(x)

    def embed(self, images: np.ndarray | torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """uint8 ``(N, H, W, 3)`` tiles -> ``(N, D)`` float16 embeddings, in batches."""
        if not len(images):
            return np.zeros((0, self.embed_dim), np.float16)
        out = [
            self.forward(images[s : s + batch_size]).float().cpu().numpy().astype(np.float16)
            for s in range(0, len(images), batch_size)
        ]
        return np.concatenate(out)


def _is_package(model: str, storage: StorageConfig | None) -> bool:
    from pathray.models.package import CONFIG_FILE
    from pathray.storage import ObjectNotFoundError, join_uri, parse_uri, stat

    if "/" not in model and "\\" not in model and "://" not in model:
        return False  # a bare name: a preset or a timm model
    try:
        stat(parse_uri(join_uri(model, CONFIG_FILE)), storage)
    except (ObjectNotFoundError, OSError, ValueError):
        return False
    return True


def load_embedder(
    model: str,
    weights: str | None = None,
    storage: StorageConfig | None = None,
    device: str = "auto",
    precision: str = "auto",
    *,
    tile_size: int | None = None,
    mpp: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> TileEmbedder:
    """Build the frozen embedding model named by ``model``.

    Args:
        model: a foundation preset (``pathray models list``), a model package's folder or URI (any
            task: its backbone's pooled embedding is used), or a timm model name.
        weights: a weights file or HF folder for a preset or timm name (``engine.weights``); None
            for a timm name means random weights, with a warning (pipeline tests only).
        device: ``auto`` (CUDA when there is one), ``cpu``, ``cuda``, ``cuda:1``.
        precision: ``auto`` (bf16 on CUDA), ``bf16`` or ``fp32``.
        tile_size, mpp: tiles other than the model's own (a preset's, a package's, else 224 px at
            0.5 µm/px); ViTs take other sizes by interpolating their position embedding.
        model_kwargs: timm keyword arguments of a timm name (``{"depth": 1}``: a tiny pipeline test).

    Raises:
        RegistryError, FileNotFoundError, ValueError: an unknown name, missing weights, a checkpoint
            that does not load exactly.
    """
    import torch

    from pathray.inference.predictor import resolve_device
    from pathray.models.config import EngineConfig
    from pathray.models.presets import get_preset
    from pathray.models.task_model import build_model
    from pathray.registry import PRESETS

    target = resolve_device(device)
    preset_info: dict[str, Any] = {}
    if _is_package(model, storage):
        from pathray.models.package import read_model_package

        if weights or model_kwargs:
            raise ValueError(f"{model} is a model package: it brings its own weights (drop --weights)")
        package = read_model_package(model, storage)
        built, _ = package.build("cpu")
        engine_module: nn.Module = built.engine
        tile, tile_mpp = package.config.input.tile_size, package.config.input.mpp
        if package.config.engine.preset:
            preset_info = {"preset": package.config.engine.preset}
        random_init = False
    else:
        if model in PRESETS.names():
            if model_kwargs:
                raise ValueError(f"{model} is a preset: its architecture is fixed (drop the model kwargs)")
            preset = get_preset(model)
            engine = EngineConfig(name="foundation", preset=model, weights=weights)
            tile, tile_mpp = preset.tile_size, preset.mpp
            preset_info = {
                "preset": preset.name,
                "arch": preset.arch,
                "pooling": preset.pooling,
                "mean": list(preset.mean),
                "std": list(preset.std),
                "tile_size": preset.tile_size,
                "mpp": preset.mpp,
            }
        else:
            engine = EngineConfig(
                name="foundation", model=model, weights=weights, model_kwargs=model_kwargs or {}
            )
            tile, tile_mpp = 224, 0.5
            if model_kwargs:
                preset_info = {"model_kwargs": dict(model_kwargs)}
        random_init = weights is None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # random weights: the same in every process
            engine_module = build_model(engine, {"name": "embedding"})[0].engine
        if random_init and model not in PRESETS.names():  # a preset's engine warns itself
            log.warning("%s: no weights given, so its weights are RANDOM (for pipeline tests only)", model)
    net = _pooled_module()(engine_module).to(target).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    tile = int(tile_size or tile)
    dim = int(getattr(engine_module, "embed_dim", 0)) or int(
        net(torch.zeros(1, tile, tile, 3, dtype=torch.uint8, device=target)).shape[-1]
    )
    bf16 = precision == "bf16" or (precision == "auto" and target.type == "cuda")
    normalisation = getattr(engine_module, "data_config", {})
    source = EmbeddingSource(
        model=model,
        weights_sha256=weights_digest(
            engine_module.backbone, normalisation.get("mean"), normalisation.get("std")
        ),
        embed_dim=dim,
        preset=preset_info,
        random_init=random_init,
    )
    return TileEmbedder(net, source, tile, float(mpp or tile_mpp), target, torch.bfloat16 if bf16 else None)
