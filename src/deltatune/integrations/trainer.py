"""transformers ``Trainer`` (and TRL's trainers) on a model that carries deltatune deltas.

:class:`DeltaTrainerMixin` changes five things of any ``Trainer`` subclass, and nothing else:

- ``save_model`` and every ``checkpoint-N`` write the deltas as delta folders
  (:func:`deltatune.save`), not the base model's tensors; tokenizer, training arguments,
  optimizer, scheduler, RNG and trainer state files stay as ``Trainer`` writes them;
- ``train(resume_from_checkpoint=...)`` and ``load_best_model_at_end`` copy the deltas back
  in place (:func:`restore_deltas`), checking the base fingerprint first;
- the loss gets the deltas' extra terms (:func:`deltatune.loss_terms`: AdaLoRA's
  orthogonality penalty);
- :class:`DeltaStepCallback` runs the deltas' per-step hooks (:func:`deltatune.after_step`:
  AdaLoRA's rank allocation, DyLoRA's rank sampling) after each optimizer step;
- ``activation_checkpointing=True`` (``gradient_checkpointing`` before transformers 5) turns on
  :func:`deltatune.enable_gradient_checkpointing` instead of Trainer's own, so a recompute runs
  the deltas its forward ran (Trainer's loses a mixed batch's per-row routing).

Example:
    >>> from deltatune.integrations import DeltaTrainer, DeltaTrainerMixin
    >>> dt.attach(model, dt.LoRAConfig(r=8))
    >>> DeltaTrainer(model=model, args=args, train_dataset=data).train()
    >>> class DeltaSFTTrainer(DeltaTrainerMixin, trl.SFTTrainer): ...
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..core.inject import after_step, list_deltas, loss_terms
from ..core.recompute import enable_gradient_checkpointing
from ..core.slot import get_slot
from ..errors import ConfigError, DeltaStateError
from .checkpoint import restore_deltas, save_deltas

TRAINING_ARGS_FILE = "training_args.bin"  # transformers' TRAINING_ARGS_NAME


class DeltaStepCallback(TrainerCallback):
    """Runs :func:`deltatune.after_step` after every optimizer step, before the gradients are
    cleared (AdaLoRA's allocator reads them). :class:`DeltaTrainerMixin` adds it itself."""

    def on_optimizer_step(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        if model is not None:
            # Trainer counts the step after this event; deltatune's hooks number steps from 1
            after_step(model, state.global_step + 1, state.max_steps)


class DeltaTrainerMixin:
    """Put before a ``Trainer`` class: ``class MyTrainer(DeltaTrainerMixin, SFTTrainer): ...``.

    Raises:
        DeltaStateError: the model has no deltas (attach one before building the trainer).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not list_deltas(self.model):
            raise DeltaStateError(
                f"{type(self).__name__} trains deltatune deltas, but this {type(self.model).__name__} has none; "
                f"call deltatune.attach(model, config) before building the trainer, or use transformers.Trainer"
            )
        _refuse_a_bypassed_head(self.model)
        self._take_over_checkpointing()
        self.add_callback(DeltaStepCallback)
        self._writing_checkpoint = False

    def _take_over_checkpointing(self) -> None:
        for switch, options in (("activation_checkpointing", "activation_checkpointing_kwargs"),
                                ("gradient_checkpointing", "gradient_checkpointing_kwargs")):
            if getattr(self.args, switch, False) is True:
                every = dict(getattr(self.args, options, None) or {}).get("every_n_layers", 1)
                enable_gradient_checkpointing(self.model, every_n_layers=every)
                setattr(self.args, switch, False)  # Trainer's own would replace the recompute context
                return

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: torch.Tensor | int | None = None) -> Any:
        """The trainer's loss plus the deltas' loss terms while training."""
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        extra = loss_terms(self.model) if model.training else None
        if extra is None:
            return result
        if self._loss_scaled_for_accumulation(num_items_in_batch):
            # Trainer will not divide this loss by the accumulation steps: add the term once per optimizer step
            extra = extra / self.current_gradient_accumulation_steps
        if return_outputs:
            loss, outputs = result
            return loss + extra, outputs
        return result + extra

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """Trainer's own test (``training_step``) of whether the loss is already normalised over
        the whole accumulated batch, so that it is not divided again."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        self._writing_checkpoint = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._writing_checkpoint = False

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Write the deltas (and, in a checkpoint, their training state) instead of the model."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_deltas(self.model, output_dir, training_state=self._writing_checkpoint)
        tokenizer = self.processing_class or getattr(self.data_collator, "tokenizer", None)
        if tokenizer is not None:
            tokenizer.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        restore_deltas(self.model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        restore_deltas(self.model, self.state.best_model_checkpoint)


def _refuse_a_bypassed_head(model: nn.Module) -> None:
    """TRL's trainers replace the model's forward with a fused LM head that multiplies by
    ``lm_head.weight`` itself: the head's own forward, and so a delta on it, never runs."""
    forward = getattr(getattr(model, "forward", None), "__func__", None)
    fused = getattr(getattr(forward, "__code__", None), "co_name", "") == "_fused_forward"  # trl's add_fused_lm_head
    head = model.get_output_embeddings() if fused and hasattr(model, "get_output_embeddings") else None
    if head is not None and get_slot(head) is not None:
        names = sorted(get_slot(head).keys())
        raise ConfigError(
            f"deltas {names} adapt the LM head of this {type(model).__name__}, but the trainer computes the loss with "
            f"a fused LM head (TRL) that reads the head's weight directly, so they would not train; leave the head "
            f"out of targets and modules_to_save, or train them with transformers.Trainer (DeltaTrainer)"
        )


class DeltaTrainer(DeltaTrainerMixin, Trainer):
    """``transformers.Trainer`` for a model with deltatune deltas (see :class:`DeltaTrainerMixin`)."""
