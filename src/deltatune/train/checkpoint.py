"""Training checkpoints that survive ``kill -9``.

A checkpoint is ``checkpoint/step-NNNNNNN.safetensors`` (trainable tensors, the deltas'
buffers (a rank allocator's running statistics and masks), optimizer state, RNG state) plus ``checkpoint/latest.json`` naming it, with its SHA-256. Under FSDP the tensors are gathered whole
(every rank takes part, rank 0 writes) and split into each rank's shards again on resume. The tensor
file is written first and the JSON last, both atomically, so ``latest.json`` always names
a complete file; older step files are removed only after the JSON points past them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..core.slot import slot_sites
from ..errors import DeltaFileError
from ..io.artifact import file_sha256
from ..io.atomic import atomic_path, write_text_atomic
from .fsdp import full_tensor, shard_like

LATEST = "latest.json"


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _delta_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of every delta unit (training state that is not a parameter), by name."""
    owned = {id(b) for _, _, slot in slot_sites(model) for b in slot.buffers()}
    return {name: b for name, b in model.named_buffers() if id(b) in owned}


def _whole(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of the whole tensor (gathered from every rank when FSDP sharded it)."""
    return full_tensor(tensor).detach().cpu().contiguous().clone()


def save_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, record: dict[str, Any],
                    *, write: bool = True) -> Path | None:
    """Write the training state after ``step`` optimizer steps.

    Under FSDP every rank calls this (the shards are gathered) and only the one with ``write``
    writes; it returns the step file, or ``None`` where nothing was written.
    """
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    tensors = {f"param/{name}": _whole(p) for name, p in params.items()}
    tensors.update({f"buffer/{name}": _whole(b) for name, b in _delta_buffers(model).items()})
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim/{index[id(param)]}/{key}"] = _whole(value)
    if not write:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    tensors["rng/torch"] = torch.get_rng_state()
    name = f"step-{step:07d}.safetensors"
    with atomic_path(folder / name) as tmp:
        safetensors.torch.save_file(tensors, str(tmp))
    meta = {"step": step, "file": name, "sha256": file_sha256(folder / name), **record}
    write_text_atomic(folder / LATEST, json.dumps(meta, indent=1))
    for old in folder.glob("step-*.safetensors"):
        if old.name != name:
            old.unlink()
    return folder / name


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable tensors, optimizer state and RNG; returns the recorded JSON."""
    latest = folder / LATEST
    if not latest.is_file():
        raise DeltaFileError(f"no checkpoint in {folder} ({LATEST} missing); train with --save-every N to write one")
    meta = json.loads(latest.read_text())
    path = folder / meta["file"]
    if not path.is_file() or file_sha256(path) != meta["sha256"]:
        raise DeltaFileError(f"checkpoint file {path} is missing or does not match {LATEST}; it cannot be resumed")
    tensors = safetensors.torch.load_file(str(path))
    params = _trainable(model)
    missing = [n for n in params if f"param/{n}" not in tensors]
    if missing:
        raise DeltaFileError(f"checkpoint {path} lacks tensors for {missing[:3]}; was it written by another run?")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(shard_like(tensors[f"param/{name}"], param))
        for name, buffer in _delta_buffers(model).items():
            if f"buffer/{name}" in tensors:  # checkpoints from before buffers were kept have none
                buffer.copy_(tensors[f"buffer/{name}"])
    for name, param in params.items():
        state = {key.split("/")[-1]: value if key.endswith("/step") else shard_like(value, param)
                 for key, value in tensors.items() if key.startswith(f"optim/{name}/")}
        if state:
            optimizer.state[param] = state
    torch.set_rng_state(tensors["rng/torch"])
    return meta
