"""How a model is spread over the workers (DDP or FSDP2), and its state as one plain state dict.

DDP goes through ``ray.train.torch.prepare_model``. FSDP does not: Ray 2.60 wraps the model in
FSDP1, which refuses to run without an accelerator ("FSDP is only available with GPU-enabled
training"; torch 2.13's FSDP1 itself: "FSDP needs a non-CPU accelerator device"). FSDP2
(``torch.distributed.fsdp.fully_shard``) runs on CUDA/NCCL and on CPU/gloo alike, so pathray
shards with it: every transformer block (or CNN stage) and the decoder are units of their own,
the rest belongs to the root. Checkpoints always hold the *full* state (gathered, on the CPU),
keyed as in the plain model: evaluation, export and a later DDP run load them unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

STRATEGIES = ("ddp", "fsdp")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Submodules that get their own FSDP unit: ViT blocks or CNN stages, then the dense decoder.

    One unit per block keeps only one block's full parameters alive at a time, which is what lets
    a ViT larger than one GPU's memory train.
    """
    engine = getattr(model, "engine", None)
    if engine is None:
        return []
    backbone = engine.backbone
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        units = list(blocks)
    else:
        units = [c for c in backbone.children() if isinstance(c, nn.Sequential) and _has_params(c)]
    decoder = getattr(engine, "decoder", None)
    if isinstance(decoder, nn.Module) and _has_params(decoder):
        units.append(decoder)
    return units


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def wrap_model(model: nn.Module, strategy: str, ddp_kwargs: dict[str, Any] | None = None) -> nn.Module:
    """The model on this worker's device, wrapped for ``strategy`` when there is more than one worker."""
    import ray.train
    import ray.train.torch

    if strategy not in STRATEGIES:
        raise ValueError(f"scale.strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "ddp":
        return ray.train.torch.prepare_model(
            model, parallel_strategy="ddp", parallel_strategy_kwargs=ddp_kwargs
        )
    model = model.to(ray.train.torch.get_device())
    if ray.train.get_context().get_world_size() == 1:
        return model  # as prepare_model does: nothing to shard over
    return shard_model(model)


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2 over the default process group: each of ``shard_units`` a unit, then the root. Ray-free,
    so a plain ``torch.distributed`` job (``benchmarks/fsdp_step.py``) shards exactly as training does.

    Every parameter becomes a ``DTensor`` holding this rank's ``Shard(0)`` slice. A model built on
    the meta device is sharded without allocating anything (its shards stay on meta).
    """
    from torch.distributed.fsdp import fully_shard

    for unit in shard_units(model):
        fully_shard(unit)
    fully_shard(model)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _full_options(**extra: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **extra)


def model_state(model: nn.Module) -> dict[str, Any]:
    """The plain model's state dict. Sharded: gathered onto rank 0's CPU (a collective: every rank
    calls it; the others get an empty dict)."""
    if not is_sharded(model):
        return _unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_full_options(cpu_offload=True))


def load_model_state(model: nn.Module, state: dict[str, Any]) -> None:
    """Load a plain (full) state dict; sharded, every rank keeps its own shard of it."""
    if not is_sharded(model):
        _unwrap(model).load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, state, options=_full_options())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state. Sharded: full and keyed by parameter name, on rank 0 (a collective)."""
    if not is_sharded(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not is_sharded(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=_full_options())


def full_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, full tensor) of every parameter; sharded ones are all-gathered (a collective)."""
    from torch.distributed.tensor import DTensor

    out = []
    for name, tensor in _unwrap(model).named_parameters():
        value = tensor.detach()
        out.append((name, value.full_tensor() if isinstance(value, DTensor) else value))
    return out


def local_share(model: nn.Module) -> float:
    """The fraction of the parameters this rank holds: 1.0 unsharded, about 1/world under FSDP."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in _unwrap(model).parameters():
        full += p.numel()
        local += p.to_local().numel() if isinstance(p, DTensor) else p.numel()
    return local / max(1, full)
