"""Each row answered by the head of the delta it was routed to, whatever that head's width.

Classification deltas of different tasks carry heads with different label counts, which cannot
take the base head's place in one batch. :class:`RowHeads` keeps each routed delta's trained
head (its one ``modules_to_save`` module, rebuilt from the delta's file with that file's shapes)
next to the model, captures the input of the model's own head during a forward pass, and scores
each row with its delta's head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..core.params import tensor_key
from ..core.saved_module import SavedModule
from ..errors import LibraryError
from ..io.artifact import read_meta, read_tensors
from .index import Library


def _head_path(meta: dict[str, Any], name: str) -> str:
    saved = meta.get("modules_to_save") or []
    if len(saved) != 1:
        raise LibraryError(f"delta {name!r} carries {len(saved)} trained module copies ({saved}); answering rows with "
                           f"their delta's head needs exactly one (its classifier head)")
    return saved[0]


class RowHeads:
    """The heads of a library's deltas, applied per row.

    Args:
        model: the base; its head module (the deltas' ``modules_to_save`` path) must be there.
        library: where the deltas' folders are found.

    Example:
        >>> heads = RowHeads(model, library)
        >>> with heads.capture(), dt.route_auto(model, library, batch, heads=False) as chosen:
        ...     model(**batch)
        >>> labels = heads.answer(chosen.choice)    # each row's label name
    """

    def __init__(self, model: nn.Module, library: Library) -> None:
        self.model, self.library = model, library
        self._heads: dict[str, tuple[nn.Module, list[str] | None, str]] = {}
        self.features: Any = None

    def head(self, name: str) -> tuple[nn.Module, list[str] | None, str]:
        """``(module, label names, path)`` of delta ``name``'s head, read once."""
        if name not in self._heads:
            folder = self.library.get(name).path
            meta = read_meta(folder)
            path = _head_path(meta, name)
            tensors = read_tensors(folder, meta)
            unit = SavedModule(self.model.get_submodule(path))
            for local in list(dict(unit.named_parameters())):
                key = tensor_key(path, local)
                if key not in tensors:
                    raise LibraryError(f"delta {name!r} has no tensor {key!r} for its head; save it again")
                owner, _, leaf = local.rpartition(".")
                setattr(unit.get_submodule(owner), leaf, nn.Parameter(tensors[key].float(), requires_grad=False))
            self._heads[name] = (unit.eval(), meta.get("labels"), path)
        return self._heads[name]

    def capture(self, names: Sequence[str] = ()) -> Any:
        """A context in which every forward of the model records its head's input (the head
        path of ``names[0]``, default the first library delta's)."""
        first = names[0] if names else self.library.names()[0]
        module = self.model.get_submodule(self.head(first)[2])
        heads = self

        class _Capture:
            def __enter__(self) -> None:
                self.handle = module.register_forward_hook(lambda m, args, out: setattr(heads, "features", args))

            def __exit__(self, *exc: object) -> None:
                self.handle.remove()

        return _Capture()

    @torch.no_grad()
    def logits(self, choice: Sequence[str]) -> list[torch.Tensor]:
        """Row ``i``'s logits from the head of ``choice[i]``, on the features of the last forward."""
        if self.features is None:
            raise LibraryError("no head input captured yet; run the model inside heads.capture() first")
        out = []
        for row, name in enumerate(choice):
            unit = self.head(name)[0]
            args = tuple(a[row:row + 1] if torch.is_tensor(a) else a for a in self.features)
            out.append(unit.forward_post(None, args, {}, None)[0])
        return out

    def answer(self, choice: Sequence[str]) -> list[str]:
        """Row ``i``'s label name by the head of ``choice[i]`` (``LABEL_<k>`` when the delta records none)."""
        answers = []
        for name, scores in zip(choice, self.logits(choice)):
            labels = self.head(name)[1]
            best = int(scores.argmax())
            answers.append(str(labels[best]) if labels and best < len(labels) else f"LABEL_{best}")
        return answers
