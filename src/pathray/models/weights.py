"""Foundation-model weights from where people keep them, loaded strictly.

    path = resolve_weights("~/.cache/huggingface/hub/models--MahmoodLab--UNI")  # newest snapshot
    state = read_checkpoint(path)                                               # .bin .pth .pt .safetensors
    load_strict(backbone, state, allow_partial=["head.*"], source=str(path))

Sources: a weights file; a Hugging Face model folder (``model.safetensors`` or
``pytorch_model.bin``, sharded or not, beside ``config.json``); an HF-cache repo folder
(``models--org--name``, resolved to ``refs/main`` or the newest snapshot); ``hf-cache:org/name``
(looked up in ``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``, offline); and,
online only, ``hf-hub:org/name`` (downloaded with huggingface_hub). Pickles are never executed:
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
WRAPPERS = ("teacher", "student", "model", "state_dict", "module")
PREFIXES = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.", "trunk.")
SHOWN = 5


class WeightsError(ValueError):
    """Weights that cannot be found, read, or that do not fit the model (names the keys)."""


class WeightsNotFoundError(WeightsError, FileNotFoundError):
    """No weights where the source points."""


def resolve_weights(source: str | os.PathLike[str], repo_id: str | None = None) -> Path:
    """The weights file (or shard index) that ``source`` names.

    Args:
        source: a file, an HF model folder, an HF-cache repo folder or snapshot, an HF cache root
            (with ``repo_id``), ``hf-cache:org/name`` or, online, ``hf-hub:org/name``.
        repo_id: ``org/name`` to look up when ``source`` is an HF cache root.
    """
    text = str(source)
    if text.startswith(("hf-hub:", "hf_hub:")):
        return _pick_file(_download(text.split(":", 1)[1]))
    if text.startswith("hf-cache:"):
        repo_id, text = text.removeprefix("hf-cache:"), str(hf_cache_root())
    path = Path(text).expanduser()
    if repo_id:
        path = path / ("models--" + repo_id.replace("/", "--"))
    if not path.exists():
        raise WeightsNotFoundError(f"weights not found: {path}")
    if path.is_dir() and (path / "snapshots").is_dir():
        path = newest_snapshot(path)
    return _pick_file(path) if path.is_dir() else path


def hf_cache_root() -> Path:
    """Where huggingface_hub keeps its cache (the same environment variables it reads)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME")
    return Path(home).expanduser() / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub"


def newest_snapshot(repo: Path) -> Path:
    """``snapshots/<rev>`` that ``refs/main`` names, else the most recently written snapshot."""
    ref = repo / "refs" / "main"
    if ref.is_file() and (repo / "snapshots" / ref.read_text().strip()).is_dir():
        return repo / "snapshots" / ref.read_text().strip()
    snapshots = [p for p in (repo / "snapshots").iterdir() if p.is_dir()]
    if not snapshots:
        raise WeightsError(f"{repo}: no snapshots in this Hugging Face cache folder")
    return max(snapshots, key=lambda p: p.stat().st_mtime)


def _pick_file(folder: Path) -> Path:
    for name in (*WEIGHT_FILES, *INDEX_FILES):
        if (folder / name).is_file():
            return folder / name
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if len(files) != 1:
        raise WeightsError(
            f"{folder}: expected {' or '.join(WEIGHT_FILES)} or exactly one {SUFFIXES} file, "
            f"found {[p.name for p in files] or 'none'}"
        )
    return files[0]


def _download(repo_id: str) -> Path:  # pragma: no cover - needs the network
    from huggingface_hub import snapshot_download

    patterns = ["*.json", *(f"*{suffix}" for suffix in SUFFIXES)]
    return Path(snapshot_download(repo_id, allow_patterns=patterns))


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The tensors in a weights file or shard index, unwrapped (``teacher``, ``model``,
    ``state_dict``, ...), with prefixes every key shares (``module.``, ``backbone.``, ...) removed and,
    where a backbone sits beside other modules (a DINO head, a task head, a decoder), only the
    backbone's keys: pathray's own run checkpoints load like any published one."""
    path = Path(path)
    if path.name.endswith(".index.json"):
        shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
        state: dict[str, Any] = {}
        for shard in shards:
            state.update(_read_file(path.parent / shard))
    else:
        state = _read_file(path)
    return backbone_only(strip_prefixes(state, source=str(path)))


def _read_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise WeightsNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for foreign or damaged pickles
        raise WeightsError(f"{path}: not a loadable state dict ({type(err).__name__}: {err})") from None
    while isinstance(obj, Mapping):
        key = next((k for k in WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return dict(obj)


def strip_prefixes(state: Mapping[str, Any], source: str = "checkpoint") -> dict[str, Tensor]:
    """Tensors only, with each of ``PREFIXES`` removed while every key starts with it."""
    tensors = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    if not tensors:
        raise WeightsError(f"{source}: no tensors found (top-level keys: {list(state)[:SHOWN]})")
    changed = True
    while changed:
        changed = False
        for prefix in PREFIXES:
            if all(k.startswith(prefix) for k in tensors):
                tensors = {k.removeprefix(prefix): v for k, v in tensors.items()}
                changed = True
    return tensors


def backbone_only(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``engine.backbone.blocks.0.x`` -> ``blocks.0.x`` for the keys under a ``backbone`` module, the
    others (heads, decoders) dropped; a state without one is returned as it is."""
    inner = {}
    for key, value in state.items():
        parts = key.split(".")
        if "backbone" in parts[:-1]:
            inner[".".join(parts[parts.index("backbone") + 1 :])] = value
    return inner or state


def matches_any(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in patterns)


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return f"{len(keys)} {keys[:SHOWN]}{more}"


def load_strict(
    model: nn.Module,
    state: Mapping[str, Tensor],
    allow_partial: Iterable[str] = (),
    source: str = "checkpoint",
) -> None:
    """Load ``state`` into ``model``: every model tensor must be there with its shape, and every
    checkpoint tensor must be used, except keys matching an ``allow_partial`` fnmatch pattern.

    Raises:
        WeightsError: naming the missing, unexpected and mis-shaped keys (first few of each, counts).
    """
    patterns = tuple(allow_partial)
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not matches_any(k, patterns))
    unexpected = sorted(k for k in state if k not in own and not matches_any(k, patterns))
    shapes = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape and not matches_any(k, patterns)
    )
    problems = [
        f"missing {_listed(missing)}" if missing else "",
        f"unexpected {_listed(unexpected)}" if unexpected else "",
        f"shape mismatch {_listed(shapes)}" if shapes else "",
    ]
    if any(problems):
        raise WeightsError(
            f"{source} does not fit the model: {'; '.join(p for p in problems if p)}. A different model "
            "or layout? To skip keys on purpose, list them in allow_partial (fnmatch, e.g. 'head.*')."
        )
    usable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    skipped = sorted(set(own) - set(usable)) + sorted(set(state) - set(usable))
    model.load_state_dict(usable, strict=False)
    if skipped:
        log.warning("%s: allow_partial skipped %s", source, _listed(skipped))
    log.info("loaded %d tensors from %s", len(usable), source)
