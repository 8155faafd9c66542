"""Delta folders in a transformers ``Trainer`` output folder, and putting them back on resume.

A folder written by :func:`save_deltas` holds the model's deltas as ordinary delta folders
(``delta.safetensors`` + ``delta.json``, written by :func:`deltatune.save`): the folder itself
when the model has one delta, else one sub-folder per delta name. A training checkpoint
also holds ``delta_state.safetensors``: every delta unit's parameters and buffers in full,
since a delta file keeps what a user needs (AdaLoRA's kept triplets only), not what training
continues from (the masked triplets, the allocator's running statistics, DyLoRA's drawn rank).

:func:`restore_deltas` copies that state into the deltas already attached to the model, in
place, so the parameters the optimizer holds stay the same objects. Everything is checked
before anything is copied: each delta's base fingerprint (from its ``delta.json``), its name,
its tensor names and shapes.
"""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from torch import nn

from ..core.inject import list_deltas
from ..core.params import tensor_key
from ..core.slot import require_state, slot_sites
from ..errors import DeltaFileError, DeltaStateError, FingerprintError
from ..io.artifact import META_FILE, check_fingerprint, read_meta, save
from ..io.atomic import atomic_path

STATE_FILE = "delta_state.safetensors"
RESUME_FIX = ("resume from a checkpoint-N folder that DeltaTrainer (or a Trainer class with DeltaTrainerMixin) "
              "wrote, or train from the start without resume_from_checkpoint")


def delta_folders(folder: str | Path) -> dict[str, Path]:
    """The delta folders :func:`save_deltas` wrote in ``folder``, by delta name (empty if none)."""
    folder = Path(folder)
    if (folder / META_FILE).is_file():
        return {read_meta(folder)["name"]: folder}
    if not folder.is_dir():
        return {}
    found = {}
    for sub in sorted(p for p in folder.iterdir() if (p / META_FILE).is_file()):
        found[read_meta(sub)["name"]] = sub
    return found


def save_deltas(model: nn.Module, folder: str | Path, *, training_state: bool = False) -> dict[str, Path]:
    """Write every delta of ``model`` into ``folder`` as delta folders.

    Args:
        model: a model with deltas attached.
        folder: the output folder; with one delta it becomes that delta's folder, with several
            each delta goes to ``folder/<name>``.
        training_state: also write ``delta_state.safetensors`` (full unit parameters and buffers)
            for :func:`restore_deltas`.

    Returns:
        the delta folders written, by delta name.
    """
    names = list_deltas(model)
    if not names:
        raise DeltaStateError(f"{type(model).__name__} has no deltas to save; attach one with deltatune.attach first")
    folder = Path(folder)
    written = {name: save(model, folder if len(names) == 1 else folder / name, name) for name in names}
    if training_state:
        with atomic_path(folder / STATE_FILE) as tmp:
            safetensors.torch.save_file(_state_tensors(model), str(tmp), metadata={"format": "deltatune-training-state"})
    return written


def _live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``<delta name>/<site>.<tensor>`` -> the live parameter or buffer of every delta unit."""
    live = {}
    for path, _, slot in slot_sites(model):
        for name in slot.keys():
            unit = slot[name]
            for key, tensor in [*unit.named_parameters(), *unit.named_buffers()]:
                live[f"{name}/{tensor_key(path, key)}"] = tensor
    return live


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in _live_tensors(model).items()}


def restore_deltas(model: nn.Module, folder: str | Path) -> list[str]:
    """Copy the deltas' training state saved in checkpoint ``folder`` into ``model``'s deltas, in place.

    The model must carry the same deltas (attached with the same configs) on the base the
    checkpoint was trained on.

    Returns:
        the names of the deltas restored.

    Raises:
        DeltaFileError: ``folder`` holds no delta or no training state, or the saved tensors do
            not fit the attached deltas (the message names the tensor).
        FingerprintError: a delta was trained on another base.
        DeltaStateError: the model's deltas are not the checkpoint's (names listed).
    """
    folder = Path(folder)
    folders = delta_folders(folder)
    if not folders:
        raise DeltaFileError(
            f"checkpoint {folder} holds no deltatune delta (no {META_FILE} in it or in a sub-folder), so there is "
            f"nothing to resume the deltas from; {RESUME_FIX}"
        )
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise DeltaFileError(
            f"{folder} holds delta folders but no {STATE_FILE}: it is a finished delta (save_model), not a training "
            f"checkpoint; load it with deltatune.load, or {RESUME_FIX}"
        )
    here = list_deltas(model)
    if sorted(here) != sorted(folders):
        raise DeltaStateError(
            f"checkpoint {folder} holds deltas {sorted(folders)} but the model has {sorted(here)}; attach the same "
            f"deltas (deltatune.attach(model, config, name=...) with the configs in their {META_FILE}) before resuming"
        )
    for name, where in folders.items():
        try:
            check_fingerprint(model, read_meta(where), "strict")
        except FingerprintError as error:
            raise FingerprintError(
                f"cannot resume from {folder}: {error} To resume, build the model from the base it was trained on; "
                f"to train this base, start without resume_from_checkpoint."
            ) from None
    try:
        saved = safetensors.torch.load_file(str(state_file))
    except Exception as error:  # safetensors raises its own error types
        raise DeltaFileError(f"{state_file} cannot be read as safetensors ({error}); the checkpoint is corrupt") from None
    live = _live_tensors(model)
    if set(saved) != set(live):
        odd = sorted(set(saved) ^ set(live))[:3]
        raise DeltaFileError(
            f"{state_file} does not fit the attached deltas (tensors {odd} are on one side only); attach them with "
            f"the configs recorded in their {META_FILE} before resuming"
        )
    for key, tensor in live.items():
        if saved[key].shape != tensor.shape:
            raise DeltaFileError(
                f"{state_file}: tensor {key!r} has shape {list(saved[key].shape)}, the attached delta has "
                f"{list(tensor.shape)}; attach it with the config recorded in its {META_FILE} before resuming"
            )
    with torch.no_grad():
        for key, tensor in live.items():
            tensor.copy_(saved[key])
    require_state(model).changed()
    return sorted(folders)
