"""A frozen public foundation model: strict weights, the preset's normalisation and pooling.

from pathray.models import load_foundation
model = load_foundation("uni", weights="~/models/UNI/pytorch_model.bin")
features = model.embed(tiles_uint8_bhwc)        # (B, model.info.dim), float32
backbone = build_backbone(get_preset("uni"), weights=...)   # the bare timm ViT, for engines
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pathray.models.layouts import LAYOUTS, detect_layout
from pathray.models.presets import FoundationPreset, get_preset
from pathray.models.timm_compat import import_timm
from pathray.models.weights import WeightsError, load_strict, matches_any, read_checkpoint, resolve_weights

log = logging.getLogger(__name__)


def _layer(name: str) -> Any:
    timm = import_timm()
    layers = {
        "swiglu_packed": timm.layers.SwiGLUPacked,
        "mlp": timm.layers.Mlp,
        "silu": nn.SiLU,
        "gelu": nn.GELU,
    }
    try:
        return layers[name]
    except KeyError:
        raise ValueError(f"unknown layer {name!r}; known: {', '.join(sorted(layers))}") from None


def timm_kwargs(preset: FoundationPreset) -> dict[str, Any]:
    """The preset's ``model_kwargs`` as ``timm.create_model`` takes them (named layers resolved)."""
    return {"num_classes": 0, "dynamic_img_size": preset.dynamic_size, **resolve_layers(preset.model_kwargs)}


def resolve_layers(model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Constructor arguments with layers named by strings (``mlp_layer: swiglu_packed``,
    ``act_layer: silu``, ``norm_eps: 1e-6``) turned into the classes timm takes."""
    kwargs: dict[str, Any] = {}
    for key, value in model_kwargs.items():
        if key == "norm_eps":
            kwargs["norm_layer"] = partial(nn.LayerNorm, eps=float(value))
        elif key in ("mlp_layer", "act_layer", "norm_layer") and isinstance(value, str):
            kwargs[key] = _layer(value)
        else:
            kwargs[key] = value
    return kwargs


_RANDOM_EXPECTED: ContextVar[bool] = ContextVar("random_init_expected", default=False)


@contextlib.contextmanager
def random_init_expected() -> Iterator[None]:
    """Build without the "no weights" warning: the caller loads trained weights right after (a
    model package, a run's checkpoint)."""
    token = _RANDOM_EXPECTED.set(True)
    try:
        yield
    finally:
        _RANDOM_EXPECTED.reset(token)


def count_parameters(preset: FoundationPreset | str) -> int:
    """The preset's parameter count, from its architecture built on the meta device (no memory)."""
    return sum(p.numel() for p in build_backbone(preset, device="meta").parameters())


def build_backbone(
    preset: FoundationPreset | str,
    weights: str | None = None,
    allow_partial: Iterable[str] = (),
    device: str | torch.device | None = None,
) -> nn.Module:
    """The preset's timm ViT, with ``weights`` loaded strictly (``None``: random init, logged).

    ``device="meta"`` builds the architecture without memory (no weights then).

    Raises:
        WeightsError: the weights cannot be found or read, are in a layout the preset does not
            accept, or do not fit (missing, unexpected or mis-shaped keys, named).
    """
    preset = get_preset(preset) if isinstance(preset, str) else preset
    timm = import_timm()
    kwargs = timm_kwargs(preset)
    on_meta = torch.device(device or "cpu").type == "meta"
    if weights is not None and on_meta:
        raise ValueError("weights cannot be loaded into a model on the meta device")
    if weights is not None and not weights.startswith("timm:"):  # read first: a bad path fails at once
        path = resolve_weights(weights)
        state, weights = read_checkpoint(path), str(path)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = timm.create_model(preset.arch, pretrained=False, **kwargs)
    if weights is None:
        if not on_meta and not _RANDOM_EXPECTED.get():
            log.warning("foundation preset %r: no weights given, the backbone is random", preset.name)
        return model
    if weights.startswith("timm:"):  # pragma: no cover - downloads
        state = timm.create_model(weights.removeprefix("timm:"), pretrained=True, **kwargs).state_dict()
    load_strict(model, to_preset_layout(preset, model, state, weights), allow_partial, source=weights)
    return model


def to_preset_layout(
    preset: FoundationPreset, model: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """A checkpoint in any layout the preset accepts, as the preset's timm ``model`` names it: keys
    converted, the layout's by-design unused keys dropped, the position embedding resampled when the
    preset is dynamic-size and the checkpoint's grid differs."""
    layout = detect_layout(state)
    if layout not in preset.layouts:
        raise WeightsError(
            f"{source}: keys are in the {layout!r} layout; "
            f"preset {preset.name!r} accepts {list(preset.layouts)}"
        )
    entry = LAYOUTS[layout]
    converted = {k: v for k, v in entry.convert(state).items() if not matches_any(k, entry.unused)}
    if preset.dynamic_size:
        converted = resample_pos_embed(model, converted, entry.antialias, source)
    return converted


def resample_pos_embed(
    model: nn.Module, state: dict[str, Tensor], antialias: bool = True, source: str = "checkpoint"
) -> dict[str, Tensor]:
    """``state`` with its position embedding resampled to ``model``'s patch grid where the two differ
    (a checkpoint trained at another image size); anything else unchanged."""
    posemb, own = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if posemb is None or own is None or posemb.shape == own.shape or posemb.shape[-1] != own.shape[-1]:
        return state
    timm = import_timm()
    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    resampled = timm.layers.resample_abs_pos_embed(
        posemb, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix, antialias=antialias
    )
    log.info("%s: resampled pos_embed %s -> %s", source, tuple(posemb.shape), tuple(own.shape))
    return {**state, "pos_embed": resampled}


@dataclass(frozen=True)
class FoundationInfo:
    """What a loaded foundation model is: for people, configs and model packages."""

    name: str
    dim: int
    embed_dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    patch_size: int
    tile_size: int
    mpp: float
    pooling: str
    params: int
    num_prefix_tokens: int
    licence: str


def pool_tokens(tokens: Tensor, pooling: str, num_prefix_tokens: int) -> Tensor:
    """(B, N, D) normed tokens -> (B, D) class token, or (B, 2D) class token + mean of the patch
    tokens (everything after the class and register tokens)."""
    cls = tokens[:, 0]
    if pooling == "cls":
        return cls
    if pooling == "cls+mean":
        return torch.cat([cls, tokens[:, num_prefix_tokens:].mean(dim=1)], dim=-1)
    raise ValueError(f"unknown pooling {pooling!r}; known: cls, cls+mean")


class FoundationModel(nn.Module):
    """A timm backbone with the preset's normalisation and pooling, in eval mode."""

    def __init__(self, preset: FoundationPreset, backbone: nn.Module) -> None:
        super().__init__()
        self.preset = preset
        self.backbone = backbone.eval()
        self.num_prefix_tokens = int(getattr(backbone, "num_prefix_tokens", 1))
        self.register_buffer("mean", torch.tensor(preset.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preset.std).view(1, 3, 1, 1), persistent=False)
        if backbone.num_features != preset.embed_dim:
            raise ValueError(
                f"preset {preset.name!r} declares {preset.embed_dim}-d tokens, its backbone has "
                f"{backbone.num_features}"
            )
        self.train(False)

    @property
    def info(self) -> FoundationInfo:
        p = self.preset
        params = sum(t.numel() for t in self.backbone.parameters())
        return FoundationInfo(
            p.name,
            p.dim,
            p.embed_dim,
            p.mean,
            p.std,
            p.patch_size,
            p.tile_size,
            p.mpp,
            p.pooling,
            params,
            self.num_prefix_tokens,
            p.licence,
        )

    def normalize(self, tiles: np.ndarray | Tensor) -> Tensor:
        """uint8 (B, H, W, 3) -> float (B, 3, H, W) with the preset's mean and std."""
        images = torch.as_tensor(tiles)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"embed expects uint8 (B, H, W, 3) tiles, got {images.dtype} {tuple(images.shape)}"
            )
        height, width = images.shape[1:3]
        patch = self.preset.patch_size
        if height % patch or width % patch:
            raise ValueError(f"{height}x{width} tiles are not a multiple of the {patch} px patch")
        if not self.preset.dynamic_size and (height, width) != tuple(self.backbone.patch_embed.img_size):
            raise ValueError(
                f"preset {self.preset.name!r} takes {tuple(self.backbone.patch_embed.img_size)} tiles, "
                f"got {height}x{width}"
            )
        x = images.to(self.mean.device).permute(0, 3, 1, 2).float().div_(255.0)
        return (x - self.mean) / self.std

    def forward(self, x: Tensor) -> Tensor:
        """Normalised (B, 3, H, W) -> pooled (B, dim)."""
        return pool_tokens(self.backbone.forward_features(x), self.preset.pooling, self.num_prefix_tokens)

    @torch.inference_mode()
    def embed(self, tiles: np.ndarray | Tensor, batch_size: int = 64) -> Tensor:
        """uint8 (B, H, W, 3) tiles -> float32 (B, dim) embeddings, in batches of ``batch_size``."""
        self.eval()
        x = self.normalize(tiles)
        if not len(x):
            return x.new_zeros(0, self.preset.dim)
        return torch.cat([self(chunk).float() for chunk in x.split(batch_size)])


def load_foundation(
    name: str | FoundationPreset,
    weights: str | None = None,
    allow_partial: Iterable[str] = (),
    device: str | torch.device | None = None,
    **overrides: Any,
) -> FoundationModel:
    """A frozen foundation model by preset name, ready to ``embed`` tiles.

    Args:
        name: a registered preset (``pathray.models.presets``) or a preset object.
        weights: see ``pathray.models.weights``; ``None`` builds a random model (with a warning).
        allow_partial: fnmatch patterns of keys that may be missing or unused.
        device: where to build it (default CPU): a random giant is initialised there, not on
            the CPU first.
        **overrides: preset fields to change (``mean``, ``std``, ``pooling``, ``tile_size``,
            ``model_kwargs`` merged over the preset's).
    """
    preset = get_preset(name) if isinstance(name, str) else name
    if overrides:
        preset = preset.replace(**overrides)
    backbone = build_backbone(preset, weights, allow_partial, device=device)
    model = FoundationModel(preset, backbone)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.to(device) if device is not None else model
