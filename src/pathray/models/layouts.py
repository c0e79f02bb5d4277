"""Checkpoint key layouts: transformers ``ViTModel`` / ``Dinov2Model`` state dicts -> timm ViT keys.

    state = to_timm(read_checkpoint(path), detect_layout(state))

A converter renames every key it knows and leaves the rest untouched, so strict loading names
whatever it did not understand. ``UNUSED`` lists the keys each layout publishes that the timm
backbone has no place for by design (transformers' masked-image-modelling token and pooler head).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

State = dict[str, Tensor]

_B = r"(?:encoder\.layer|layers)\.(\d+)\."  # a block: published "encoder.layer.N", transformers 5 "layers.N"
_EMBEDDINGS = (
    (r"embeddings\.cls_token", "cls_token"),
    (r"embeddings\.position_embeddings", "pos_embed"),
    (r"embeddings\.patch_embeddings\.projection\.(weight|bias)", r"patch_embed.proj.\1"),
    (_B + r"attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (_B + r"attention\.o_proj\.", r"blocks.\1.attn.proj."),
    (r"layernorm\.(weight|bias)", r"norm.\1"),
)
_VIT_HF = (
    *_EMBEDDINGS,
    (_B + r"layernorm_before\.", r"blocks.\1.norm1."),
    (_B + r"layernorm_after\.", r"blocks.\1.norm2."),
    (_B + r"intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (_B + r"output\.dense\.", r"blocks.\1.mlp.fc2."),
    (_B + r"mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
)
_DINOV2_HF = (
    *_EMBEDDINGS,
    (_B + r"norm([12])\.", r"blocks.\1.norm\2."),
    (_B + r"layer_scale([12])\.lambda1", r"blocks.\1.ls\2.gamma"),
    (_B + r"mlp\.(fc1|fc2)\.", r"blocks.\1.mlp.\2."),
    (_B + r"mlp\.weights_in\.", r"blocks.\1.mlp.fc1."),  # SwiGLU, packed [gate; up]
    (_B + r"mlp\.weights_out\.", r"blocks.\1.mlp.fc2."),
    (_B + r"mlp\.down_proj\.", r"blocks.\1.mlp.fc2."),  # SwiGLU split in two (transformers 5)
)
_QKV = re.compile(_B + r"attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)\.(weight|bias)")
_GATE_UP = re.compile(_B + r"mlp\.(gate_proj|up_proj)\.(weight|bias)")
_PART = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v"}


@dataclass(frozen=True)
class KeyLayout:
    """How one published layout maps onto timm.

    Attributes:
        convert: state dict in this layout -> timm keys (unknown keys untouched).
        unused: fnmatch patterns of published keys the backbone does not use.
        antialias: whether the reference implementation antialiases when it resamples the
            position embedding (timm does; transformers does not).
    """

    convert: Callable[[Mapping[str, Tensor]], State]
    unused: tuple[str, ...] = ()
    antialias: bool = True


def _rename(state: Mapping[str, Tensor], rules: tuple[tuple[str, str], ...]) -> State:
    """Rename by the first matching rule: a pattern ending in ``\\.`` renames a key prefix, any other
    pattern the whole key."""
    compiled = [(re.compile(p if p.endswith(r"\.") else p + "$"), repl) for p, repl in rules]
    out: State = {}
    for key, value in state.items():
        new = key
        for pattern, repl in compiled:
            if pattern.match(key):
                new = pattern.sub(repl, key, count=1)
                break
        if new in out:
            raise ValueError(f"two checkpoint keys map to {new!r} (one is {key!r})")
        out[new] = value
    return out


def _merge(state: State, pattern: re.Pattern[str], parts: tuple[str, ...], target: str) -> State:
    """Concatenate per-block ``parts`` (q, k, v or gate, up) along dim 0 into ``blocks.N.<target>``;
    incomplete groups are left as they are, so strict loading names them."""
    groups: dict[tuple[str, str], dict[str, str]] = {}
    for key in state:
        match = pattern.fullmatch(key)
        if match:
            block, part, kind = match.groups()
            groups.setdefault((block, kind), {})[_PART.get(part, part)] = key
    for (block, kind), keys in groups.items():
        if set(keys) != set(parts):
            continue
        state[f"blocks.{block}.{target}.{kind}"] = torch.cat([state.pop(keys[p]) for p in parts], dim=0)
    return state


def vit_hf_to_timm(state: Mapping[str, Tensor]) -> State:
    """transformers ``ViTModel`` keys -> timm ``VisionTransformer`` keys (q, k, v -> one qkv)."""
    return _merge(_rename(state, _VIT_HF), _QKV, ("q", "k", "v"), "attn.qkv")


def dinov2_hf_to_timm(state: Mapping[str, Tensor]) -> State:
    """transformers ``Dinov2Model`` keys -> timm keys: LayerScale ``lambda1`` -> ``ls*.gamma``, and
    the SwiGLU MLP (``weights_in``/``weights_out``, or ``gate_proj``/``up_proj``/``down_proj``) ->
    timm's ``SwiGLUPacked`` ``fc1`` = [gate; up] and ``fc2``."""
    out = _merge(_rename(state, _DINOV2_HF), _QKV, ("q", "k", "v"), "attn.qkv")
    return _merge(out, _GATE_UP, ("gate_proj", "up_proj"), "mlp.fc1")


LAYOUTS: dict[str, KeyLayout] = {
    "timm": KeyLayout(dict),
    "vit_hf": KeyLayout(vit_hf_to_timm, unused=("pooler.*",), antialias=False),
    "dinov2_hf": KeyLayout(dinov2_hf_to_timm, unused=("embeddings.mask_token",), antialias=False),
}


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """``timm``, ``vit_hf`` or ``dinov2_hf``, from the key names."""
    keys = list(state)
    if not any(k.startswith(("embeddings.", "encoder.layer.", "layers.")) for k in keys):
        return "timm"
    if any(".layernorm_before." in k for k in keys):
        return "vit_hf"
    return "dinov2_hf"
