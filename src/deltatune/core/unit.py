"""The protocol every method's per-site part implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..errors import MergeError, NotApplicableError
from .rows import per_delta_post

if TYPE_CHECKING:
    from .rows import Routing

Args = tuple[Any, ...]
Kwargs = dict[str, Any]


class DeltaUnit(nn.Module):
    """One delta's part at one site (a module of the base model).

    A unit never replaces its module: the site's :class:`DeltaSlot` calls the unit from
    forward hooks, so the base module keeps its class, attributes and state-dict names.
    Override only what the method needs:

    - :meth:`forward_pre` changes the module's inputs (e.g. (IA)3 on a feed-forward input);
    - :meth:`forward_post` changes its output (LoRA adds ``B A x``; adapters add a bottleneck);
    - :meth:`merge_params` folds the unit into the module's weights (mergeable methods only);
    - :meth:`run` computes the whole module call when the unit is the only one running there
      (the default: ``forward_pre``, the module, ``forward_post``), for a faster kernel.
    """

    #: 0 for units that transform the output, 1 for those that transform the input. Merging
    #: applies output units first, so a merged stack computes what the hooks compute.
    merge_order: ClassVar[int] = 0
    #: whether the class overrides :meth:`forward_pre` (set for every subclass)
    _changes_inputs: ClassVar[bool] = False

    def forward_pre(self, module: nn.Module, args: Args, kwargs: Kwargs) -> tuple[Args, Kwargs]:
        return args, kwargs

    def forward_post(self, module: nn.Module, args: Args, kwargs: Kwargs, output: Any) -> Any:
        return output

    def run(self, module: nn.Module, own: Any, args: Args, kwargs: Kwargs) -> Any:
        """The module's output with this unit applied, when it is the only unit running at the
        module. ``own(*args, **kwargs)`` runs the module's own forward. Override it to compute
        the call in one go; it must equal ``forward_pre``, ``own``, ``forward_post``."""
        if self._changes_inputs:
            args, kwargs = self.forward_pre(module, args, kwargs)
        return self.forward_post(module, args, kwargs, own(*args, **kwargs))

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._changes_inputs = cls.overrides("forward_pre")

    def merge_params(self, module: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """New values for the module's own parameters with this unit folded in.

        Args:
            module: the site module.
            params: its current parameter values by relative name (``"weight"``, ``"bias"``).

        Returns:
            the changed entries (others are kept).
        """
        raise MergeError(f"{type(self).__name__} changes activations, not weights; it cannot be merged")

    @classmethod
    def mixed_post(cls, units: list[DeltaUnit | None], module: nn.Module, args: Args, kwargs: Kwargs, output: Any,
                   routing: Routing) -> Any:
        """:meth:`forward_post` for a mixed batch: row ``i`` gets ``units[routing.index[i]]``
        (``None``, and the base index, leave the row unchanged).

        The default runs each unit on its own rows; methods override it with one batched
        computation over stacked weights.
        """
        return per_delta_post(units, module, args, kwargs, output, routing)

    @classmethod
    def mixed_pre(cls, units: list[DeltaUnit | None], module: nn.Module, args: Args, kwargs: Kwargs,
                  routing: Routing) -> tuple[Args, Kwargs]:
        """:meth:`forward_pre` for a mixed batch; methods that change inputs override it."""
        raise NotApplicableError(
            f"{cls.__name__} units cannot take part in a batch that mixes deltas per row; run those rows as "
            f"their own batch (with using(model, name))"
        )

    def low_rank_update(self) -> tuple[torch.Tensor, torch.Tensor, bool] | None:
        """The unit's weight change as low-rank factors ``(B, A, transposed)`` with
        ``delta = B @ A`` (scaling folded into ``B``; ``transposed``: the module stores its
        weight as ``(in, out)``, so the change to that tensor is ``(B @ A).T``), or ``None``
        when the change is not a plain low-rank product (task vectors then take the dense
        difference from :meth:`merge_params`)."""
        return None

    def load_low_rank(self, B: torch.Tensor, A: torch.Tensor) -> bool:
        """Set the unit's parameters so that its update is ``B @ A`` (in :meth:`low_rank_update`'s
        frame, scaling folded into ``B``; ``B`` has at most the unit's rank columns) and return
        True; return False, changing nothing, when its parameters are not such factors (the
        default: DoRA's magnitude, LoRA-XS's frozen bases). Federated aggregation uses it to
        store the re-factored sum of the clients' updates."""
        return False

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors a delta file stores for this unit, by name."""
        return {name: p.detach() for name, p in self.named_parameters()}

    def load_saved(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy tensors written by :meth:`saved_tensors` into this unit."""
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)

    def fingerprint_module(self, module: nn.Module, model: nn.Module) -> nn.Module | None:
        """The base module whose tensors identify the base this unit belongs to."""
        return module

    def attached(self, module: nn.Module, model: nn.Module) -> None:
        """Called once after the unit is installed on ``module``."""

    def detached(self, module: nn.Module, model: nn.Module) -> None:
        """Called once after the unit is removed from ``module``."""

    @classmethod
    def overrides(cls, hook: str) -> bool:
        mine, base = getattr(cls, hook), getattr(DeltaUnit, hook)
        return getattr(mine, "__func__", mine) is not getattr(base, "__func__", base)


@dataclass
class Placement:
    """A unit to install at the module called ``path`` (``""`` is the model itself)."""

    path: str
    unit: DeltaUnit
    #: the site module's type name, for the attach report
    module_type: str = ""


class Placements(list):
    """What a method's ``build`` returns: placements, plus matched modules it skipped and why.

    ``resolved`` is the config with any defaults the build filled in made explicit (what a
    saved delta must record to be rebuilt the same way); ``None`` when nothing was filled in.
    """

    def __init__(self, items=(), skipped=(), resolved=None) -> None:
        super().__init__(items)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.resolved = resolved
