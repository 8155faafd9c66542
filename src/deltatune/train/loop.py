"""The training loop: AdamW, linear warm-up and decay, progress bar, evaluation,
checkpoints, and a clean stop when the loss turns NaN."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.inject import after_step, loss_terms
from ..core.recompute import enable_gradient_checkpointing
from ..errors import DeltaError
from . import distributed
from .batches import IGNORE, BatchPlan, Encoded, to_device
from .checkpoint import load_checkpoint, save_checkpoint
from .metrics import evaluate


class TrainingDiverged(DeltaError, RuntimeError):
    """The loss became NaN or inf; training stopped."""


@dataclass
class Settings:
    """How to train. ``steps`` wins over ``epochs`` when both are given."""

    epochs: float = 1.0
    steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_ratio: float = 0.06
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 0
    save_every: int = 0
    progress: bool = True
    sharding: str = "ddp"
    #: recompute each block's activations in the backward pass (transformers models; see core/recompute.py)
    gradient_checkpointing: bool = False


@dataclass
class History:
    train: list[tuple[int, float]] = field(default_factory=list)
    validation: list[tuple[int, dict[str, float]]] = field(default_factory=list)


def total_steps(settings: Settings, examples: int) -> int:
    if settings.steps is not None:
        return settings.steps
    return max(1, math.ceil(math.ceil(examples / settings.batch_size) * settings.epochs))


def loss_items(data: Encoded, rows: list[int]) -> int:
    """How many terms a batch's loss averages over: its examples (classification) or its
    predicted tokens (causal LM: labels after the one-token shift that are not ignored)."""
    if data.task == "classification":
        return len(rows)
    return sum(sum(label != IGNORE for label in data.labels[i][1:]) for i in rows)


def learning_rate(settings: Settings, step: int, total: int) -> float:
    warmup = int(total * settings.warmup_ratio)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    return settings.lr * max(0.0, (total - step) / max(1, total - warmup))


def train(
    model: nn.Module,
    train_data: Encoded,
    settings: Settings,
    *,
    validation: Encoded | None = None,
    num_labels: int = 2,
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    on_eval: Callable[[int, dict[str, float]], bool | None] | None = None,
) -> dict[str, Any]:
    """Train the model's trainable parameters; returns history and timing.

    ``on_eval(step, metrics)`` is called after each evaluation on ``validation`` (every
    ``settings.eval_every`` steps); when it returns a true value training stops after that step
    (early stopping, a sweep's pruning), and ``steps`` in the result is the steps done.

    Under a launcher with ``settings.sharding == "fsdp"`` the model is left sharded (see
    :mod:`.fsdp`): every rank must then take part in its forwards and in
    :func:`.fsdp.full_parameters`.

    Raises:
        TrainingDiverged: the loss became NaN/inf (the last checkpoint, if any, is kept).
    """
    if not any(p.requires_grad for p in model.parameters()):
        raise DeltaError("the model has no trainable parameters; attach a delta first")
    if settings.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    runner = distributed.wrap(model, settings.sharding)  # before the optimizer: FSDP replaces the parameters
    # under FSDP every rank takes part in every forward and gather, so all evaluate and checkpoint
    collective = settings.sharding == "fsdp" and distributed.rank_and_world()[1] > 1
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    total = total_steps(settings, len(train_data))
    plan = BatchPlan(len(train_data), settings.batch_size, settings.seed)
    history, start, elapsed = History(), 0, 0.0
    torch.manual_seed(settings.seed)
    if resume and checkpoint_dir is not None:
        record = load_checkpoint(checkpoint_dir, model, optimizer)
        start, elapsed = record["step"], record.get("seconds", 0.0)
        history.train = [tuple(x) for x in record["history"]["train"]]
        history.validation = [tuple(x) for x in record["history"]["validation"]]
    device = next(model.parameters()).device
    rank, world = distributed.rank_and_world()
    if rank:  # every rank was seeded alike; give the others their own dropout masks
        torch.manual_seed(settings.seed * 1_000_003 + rank * 10_007 + start)
    tokens = 0
    began = time.perf_counter()
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", disable=not settings.progress or rank != 0,
               dynamic_ncols=True)
    model.train()
    for step in bar:
        everyone = plan.rows(step)
        rows = everyone[rank::world]
        # a rank left without rows (a last batch smaller than the world) still runs one row,
        # weighted 0 below, so that the gradient all-reduce (DDP) or reduce-scatter (FSDP) sees every rank
        batch = to_device(train_data.collate(rows or everyone[:1]), device)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(settings, step, total)
        loss = runner(**batch).loss
        if world > 1:
            # DDP and FSDP average gradients over ranks; weighting each rank's mean loss by its share of
            # the global batch's loss terms makes that average the global batch's mean, also when
            # the batch does not split evenly (or a rank's tokens differ, for causal LM)
            share = loss_items(train_data, rows) / max(1, loss_items(train_data, everyone))
            loss = loss * (share * world)
        extra = loss_terms(model)  # methods' regularisers, added once per rank (DDP averages them)
        if extra is not None:
            loss = loss + extra
        logged = distributed.mean(loss.detach())  # the same on every rank, so all stop together
        if not torch.isfinite(logged):
            bar.close()
            kept = f"the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir and (checkpoint_dir / "latest.json").exists() else "no checkpoint was written (use --save-every N)"
            raise TrainingDiverged(f"loss became {logged.item()} at step {step + 1}; training stopped, {kept}. Lower --lr and resume or restart.")
        loss.backward()
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)
        optimizer.step()
        after_step(model, step + 1, total)  # before zero_grad: hooks may read the gradients
        optimizer.zero_grad(set_to_none=True)
        tokens += int(batch["attention_mask"].sum()) if rows else 0
        history.train.append((step + 1, logged.item()))
        bar.set_postfix(loss=f"{history.train[-1][1]:.4f}")
        if validation is not None and settings.eval_every and (step + 1) % settings.eval_every == 0 and (rank == 0 or collective):
            history.validation.append((step + 1, evaluate(model, validation, num_labels=num_labels)))
            bar.set_postfix(loss=f"{history.train[-1][1]:.4f}", **{f"val_{k}": f"{v:.3f}" for k, v in history.validation[-1][1].items()})
        if on_eval is not None and validation is not None and settings.eval_every and (step + 1) % settings.eval_every == 0:
            # rank 0 evaluated (and decides); under a launcher every rank stops with it
            if distributed.from_main(bool(rank == 0 and on_eval(step + 1, history.validation[-1][1]))):
                total = step + 1
                break
        if checkpoint_dir is not None and settings.save_every and (step + 1) % settings.save_every == 0 and (rank == 0 or collective):
            save_checkpoint(checkpoint_dir, model, optimizer, step + 1, {
                "seconds": elapsed + time.perf_counter() - began,
                "history": {"train": history.train, "validation": history.validation},
            }, write=rank == 0)
    bar.close()
    seconds = elapsed + time.perf_counter() - began
    return {"history": history, "steps": total, "seconds": seconds,
            "tokens_per_second": distributed.total(tokens) / max(1e-9, time.perf_counter() - began)}
