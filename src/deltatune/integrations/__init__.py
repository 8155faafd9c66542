"""deltatune inside other libraries' training loops: transformers ``Trainer`` and TRL.

Not imported by ``import deltatune`` (it loads transformers' Trainer); import it yourself:
``from deltatune.integrations import DeltaTrainer``. See docs/INTEGRATIONS.md.
"""

from .checkpoint import STATE_FILE, delta_folders, restore_deltas, save_deltas
from .trainer import DeltaStepCallback, DeltaTrainer, DeltaTrainerMixin

__all__ = ["STATE_FILE", "DeltaStepCallback", "DeltaTrainer", "DeltaTrainerMixin", "delta_folders", "restore_deltas",
           "save_deltas"]
