"""The engine contract: a timm backbone plus a dense decoder, with its normalisation and LR groups.

Every engine answers the same contract, so every task head runs on every engine::

    engine = build_engine(EngineConfig(name="debug_vit"))       # pathray.models.engines
    pooled, dense = engine(engine.normalize(tiles_uint8_bhwc))  # (B, D), (B, C, H/4, W/4)

The engines themselves live in ``vit.py`` (ViT + token decoder) and ``unet.py`` (CNN + U-Net).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from pathray.models.config import EngineConfig
from pathray.models.foundation import resolve_layers
from pathray.models.timm_compat import import_timm
from pathray.models.weights import load_strict, read_checkpoint, resolve_weights


def conv_norm_act(cin: int, cout: int, kernel: int = 3) -> nn.Sequential:
    """Conv, GroupNorm, GELU: batch-size independent, so one-tile batches train and serve alike."""
    groups = 8 if cout % 8 == 0 else 1
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.GroupNorm(groups, cout), nn.GELU()
    )


def create_backbone(
    config: EngineConfig, default: str, optional: Mapping[str, Any], **kwargs: Any
) -> nn.Module:
    """``timm.create_model`` with random init, or pretrained from the hub for ``weights="timm:<id>"``.

    ``optional`` kwargs (``dynamic_img_size``, ...) are dropped for models that do not take them;
    ``config.model_kwargs`` (layers by name) go over the engine's own ``kwargs``.
    """
    timm = import_timm()
    name, pretrained = config.model or default, False
    if config.weights and config.weights.startswith("timm:"):
        name, pretrained = config.weights.removeprefix("timm:"), True
    kwargs = {"drop_path_rate": config.drop_path, **kwargs, **resolve_layers(config.model_kwargs)}
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs, **optional)
    except TypeError as err:
        if not optional or not any(key in str(err) for key in optional):
            raise
        return timm.create_model(name, pretrained=pretrained, **kwargs)


class Engine(nn.Module):
    """Backbone + dense decoder. Subclasses build both, then implement ``forward``.

    ``num_layers`` and ``layer_id`` drive layer-wise LR decay: backbone parameter ``name`` gets
    ``lr * layer_decay ** (num_layers - layer_id(name))``; the decoder keeps the full lr.
    """

    dense_stride = 4
    num_layers = 0

    def __init__(
        self,
        config: EngineConfig,
        backbone: nn.Module,
        embed_dim: int,
        normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
        weights_loaded: bool = False,
    ) -> None:
        """``normalisation``: (mean, std) of the backbone (default: timm's data config); ``config.mean``
        and ``config.std`` win over it. ``weights_loaded``: the builder already loaded
        ``config.weights`` (a preset's backbone), else a local file is loaded here, strictly."""
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.embed_dim = embed_dim
        self.dense_channels = config.dense_channels
        timm = import_timm()
        size = {"input_size": (3, config.img_size, config.img_size)} if config.img_size else {}
        resolved = timm.data.resolve_data_config(size, model=backbone)
        self.data_config: dict[str, Any] = dict(resolved)
        self.register_buffer("_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.ones(1, 3, 1, 1), persistent=False)
        mean, std = normalisation or (resolved["mean"], resolved["std"])
        self.set_normalization(config.mean or mean, config.std or std)
        self._frozen = False
        if config.weights and not config.weights.startswith("timm:") and not weights_loaded:
            self.load_backbone_weights(config.weights)

    def prepare_training(self) -> None:
        """Apply ``config.finetune`` (which backbone parameters train) and ``grad_checkpointing``;
        ``build_engine`` calls it once the subclass has built its decoder and layer ids."""
        from pathray.models.finetune import apply_finetune

        kind, count = self.config.finetune_mode
        apply_finetune(self, kind, count, self.config.lora_rank, self.config.lora_alpha)
        if self.config.grad_checkpointing:
            if not hasattr(self.backbone, "set_grad_checkpointing"):
                raise ValueError(f"engine {self.config.name}: the backbone has no gradient checkpointing")
            self.backbone.set_grad_checkpointing(True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def pooled(self, x: Tensor) -> Tensor:
        """The pooled embedding alone, ``self(x)[0]``: engines override it to skip the dense decoder,
        which embedding a cohort would compute for nothing."""
        return self(x)[0]

    def set_normalization(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        """Normalise inputs with ``mean``/``std``: the model's own (timm's data config), or a model
        package's, recorded when it was made."""
        self.data_config = {
            **self.data_config,
            "mean": tuple(map(float, mean)),
            "std": tuple(map(float, std)),
        }
        self._mean.copy_(torch.tensor(self.data_config["mean"]).view(1, 3, 1, 1))
        self._std.copy_(torch.tensor(self.data_config["std"]).view(1, 3, 1, 1))

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (B, H, W, 3), as the tile stream delivers it -> float (B, 3, H, W), model mean/std."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"normalize expects uint8 (B, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        x = images.permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self._mean.to(x.device)) / self._std.to(x.device)

    def layer_id(self, name: str) -> int:
        """Depth of backbone parameter ``name`` for LR decay; the default applies no decay."""
        return self.num_layers

    def param_groups(
        self, lr: float, weight_decay: float, layer_decay: float = 1.0, patch_embed_lr_mult: float = 1.0
    ) -> list[dict[str, Any]]:
        """Optimizer groups: layer-wise LR decay over the backbone (a ViT's patch embedding times
        ``patch_embed_lr_mult`` besides, DINOv2's 0.2), no weight decay on norms, biases and
        position/class tokens. Frozen parameters are left out; task heads are not part of the
        engine, so the caller adds them at full lr."""
        skip = set(getattr(self.backbone, "no_weight_decay", set)())
        groups: dict[tuple[float, bool], dict[str, Any]] = {}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            scale, sub = 1.0, ""
            if name.startswith("backbone."):
                sub = name.removeprefix("backbone.")
                scale = layer_decay ** (self.num_layers - self.layer_id(sub))
                if sub.startswith("patch_embed."):
                    scale *= patch_embed_lr_mult
            decay = not (param.ndim <= 1 or name.endswith(".bias") or sub in skip)
            group = groups.setdefault(
                (scale, decay),
                {
                    "params": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": weight_decay if decay else 0.0,
                    "name": f"scale{scale:.4g}_{'decay' if decay else 'no_decay'}",
                },
            )
            group["params"].append(param)
        return [groups[key] for key in sorted(groups)]

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Stop (or restart) training the backbone; a frozen backbone also stays in eval mode."""
        for param in self.backbone.parameters():
            param.requires_grad_(not frozen)
        self._frozen = frozen
        self.train(self.training)

    def train(self, mode: bool = True) -> Engine:
        super().train(mode)
        if self._frozen:
            self.backbone.eval()  # no BatchNorm statistics updates, no dropout in a frozen backbone
        return self

    @contextlib.contextmanager
    def backbone_context(self) -> Iterator[None]:
        """No autograd graph through a frozen backbone: less memory, same result."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self._frozen):
            yield

    def adapt_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook for engine-specific key or shape conversions of a loaded checkpoint."""
        return state

    def load_backbone_weights(self, source: str) -> None:
        """Load weights into the backbone strictly (``pathray.models.weights``): a local file, an HF
        folder or cache snapshot, or a pathray run's ``checkpoint.pt`` (its backbone or DINO teacher).

        Raises:
            WeightsError: naming the missing, unexpected and mis-shaped keys
                (``config.allow_partial`` lists the ones that may be skipped).
        """
        path = resolve_weights(source)
        state = self.adapt_state_dict(read_checkpoint(path))
        load_strict(self.backbone, state, self.config.allow_partial, source=str(path))
