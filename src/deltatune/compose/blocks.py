"""Composition blocks as data: Stack, Parallel, Average, BatchSplit and Fuse.

A block names deltas (its leaves, plain strings) and how to combine them at every module
they act on. Blocks nest, check their own shape when built, check the model they are used
on with :meth:`Block.validate`, and round-trip through :meth:`Block.to_dict` / JSON.
Evaluation lives in ``compose/run.py``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Union

from ..errors import ConfigError
from .checks import check_composition

if TYPE_CHECKING:
    from torch import nn

Child = Union[str, "Block"]


class Block:
    """A node of a composition: children (delta names or blocks) and the rule that combines them."""

    #: the block's name in serialised form (``{"block": "stack", ...}``)
    kind: ClassVar[str] = ""
    #: children applied one after the other to the same rows (any delta can take part)
    sequential: ClassVar[bool] = False

    def __init__(self, *children: Child) -> None:
        if len(children) == 1 and isinstance(children[0], (list, tuple)):
            children = tuple(children[0])  # Stack(["a", "b"]) reads like Stack("a", "b")
        self.children: tuple[Child, ...] = tuple(children)
        self._check_shape()

    # --- structure ---------------------------------------------------------------------

    def _check_shape(self) -> None:
        name = type(self).__name__
        if not self.children:
            raise ConfigError(f"{name}() has no children; give it delta names or blocks, e.g. {name}('a', 'b')")
        for i, child in enumerate(self.children):
            if isinstance(child, str):
                if not child:
                    raise ConfigError(f"{name} child {i} is an empty string; give a delta name")
            elif not isinstance(child, Block):
                raise ConfigError(
                    f"{name} child {i} is a {type(child).__name__} ({child!r}); children are delta names (str) "
                    f"or blocks (Stack, Parallel, Average, BatchSplit, Fuse)"
                )
        row_names(self)  # a delta applies at most once to a row

    def fields(self) -> dict[str, Any]:
        """The block's own settings besides its children (weights, sizes, fusion)."""
        return {}

    def fusion_name(self) -> str | None:
        """The fusion delta a Fuse block runs, else ``None``."""
        return None

    def names(self) -> list[str]:
        """Every delta name in the block, nested ones included, first occurrence order."""
        return list(dict.fromkeys(name for name, _ in self.leaves()))

    def leaves(self, enclosing: tuple[Block, ...] = ()) -> Iterator[tuple[str, tuple[Block, ...]]]:
        """``(name, blocks enclosing it, outermost first)`` for every leaf."""
        chain = (*enclosing, self)
        for child in self.children:
            if isinstance(child, Block):
                yield from child.leaves(chain)
            else:
                yield child, chain

    def blocks(self) -> Iterator[Block]:
        """This block and every nested block, depth first."""
        yield self
        for child in self.children:
            if isinstance(child, Block):
                yield from child.blocks()

    # --- serialisation -------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :func:`block_from_dict` turns it back into an equal block."""
        children = [c.to_dict() if isinstance(c, Block) else c for c in self.children]
        return {"block": self.kind, "children": children, **self.fields()}

    def to_json(self, **dump_options: Any) -> str:
        return json.dumps(self.to_dict(), **dump_options)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Block:
        """Rebuild any block from :meth:`to_dict` output (dispatching on its ``block`` field)."""
        return block_from_dict(data)

    @classmethod
    def from_json(cls, text: str) -> Block:
        return block_from_dict(json.loads(text))

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.to_dict() == self.to_dict()

    def __hash__(self) -> int:
        return hash(self.to_json(sort_keys=True))

    def __repr__(self) -> str:
        parts = [repr(c) for c in self.children] + [f"{k}={v!r}" for k, v in self.fields().items()]
        return f"{type(self).__name__}({', '.join(parts)})"

    # --- checking against a model --------------------------------------------------------

    def validate(self, model: nn.Module) -> None:
        """Check that this composition can run on ``model``: every name is an unmerged delta
        of it, fusion deltas match their Fuse, and every delta can take part in its block.

        Raises:
            DeltaStateError: an unknown or merged delta name.
            ConfigError: a fusion delta used as a plain delta, or a Fuse whose children differ
                from the deltas its fusion was made for.
            NotApplicableError: a delta whose method cannot take part in its block (prefix or
                prompt tuning anywhere but in a Stack; input-changing units under Fuse).
        """
        check_composition(self, model)


class Stack(Block):
    """Children applied one after the other at every module (what ``set_active([a, b])`` does).

    Example:
        >>> Stack("language", "task")
    """

    kind = "stack"
    sequential = True


class Parallel(Block):
    """Each child's change to a module's output (or input) computed from the same starting
    point, weighted and summed: ``y = base + sum_i w_i (f_i(base) - base)``.

    Args:
        children: delta names or blocks.
        weights: one number per child (default: all ones).

    Example:
        >>> Parallel("sentiment", "topic", weights=[0.7, 0.3])
    """

    kind = "parallel"

    def __init__(self, *children: Child, weights: Sequence[float] | None = None) -> None:
        self.weights: tuple[float, ...] | None = None if weights is None else tuple(weights)
        super().__init__(*children)

    def _check_shape(self) -> None:
        super()._check_shape()
        if self.weights is None:
            return
        if len(self.weights) != len(self.children):
            raise ConfigError(
                f"{type(self).__name__} has {len(self.children)} children but {len(self.weights)} weights "
                f"{list(self.weights)}; give one weight per child"
            )
        for w in self.weights:
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
                raise ConfigError(f"{type(self).__name__} weight {w!r} is not a finite number; weights are floats")
        self.weights = tuple(float(w) for w in self.weights)

    def child_weights(self) -> tuple[float, ...]:
        return self.weights if self.weights is not None else (1.0,) * len(self.children)

    def fields(self) -> dict[str, Any]:
        return {} if self.weights is None else {"weights": list(self.weights)}


class Average(Parallel):
    """:class:`Parallel` with equal weights summing to one: the mean of the children's outputs.

    Example:
        >>> Average("seed0", "seed1", "seed2")
    """

    kind = "average"

    def __init__(self, *children: Child) -> None:
        super().__init__(*children)

    def child_weights(self) -> tuple[float, ...]:
        return (1.0 / len(self.children),) * len(self.children)


class BatchSplit(Block):
    """Consecutive blocks of rows go to the children: the first ``sizes[0]`` rows to the first
    child, and so on. The sizes must add up to the batch (checked at run time).

    Example:
        >>> BatchSplit("sentiment", Stack("lang", "topic"), sizes=[4, 4])
    """

    kind = "batch_split"

    def __init__(self, *children: Child, sizes: Sequence[int]) -> None:
        self.sizes: tuple[int, ...] = tuple(sizes)
        super().__init__(*children)

    def _check_shape(self) -> None:
        super()._check_shape()
        if len(self.sizes) != len(self.children):
            raise ConfigError(
                f"BatchSplit has {len(self.children)} children but sizes {list(self.sizes)}; give one row count "
                f"per child"
            )
        for size in self.sizes:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ConfigError(f"BatchSplit size {size!r} is not a row count; sizes are non-negative integers")

    def fields(self) -> dict[str, Any]:
        return {"sizes": list(self.sizes)}


class Fuse(Block):
    """AdapterFusion (Pfeiffer et al., 2021, arXiv:2005.00247): at each module, a trained
    attention whose query is the module's output and whose keys and values are the fused
    deltas' outputs. The attention's parameters are the delta ``fusion`` (method
    ``"fusion"``, made for exactly these children).

    Children are delta names: the fusion attends over each named delta's own output.

    Example:
        >>> dt.attach(model, FusionConfig(fused=("sentiment", "topic")), name="mix")
        >>> Fuse("sentiment", "topic", fusion="mix")
    """

    kind = "fuse"

    def __init__(self, *children: Child, fusion: str) -> None:
        self.fusion = fusion
        super().__init__(*children)

    def _check_shape(self) -> None:
        super()._check_shape()
        if not isinstance(self.fusion, str) or not self.fusion:
            raise ConfigError(f"Fuse needs the name of its fusion delta, got fusion={self.fusion!r}")
        nested = [c for c in self.children if isinstance(c, Block)]
        if nested:
            raise ConfigError(
                f"Fuse children must be delta names, got {nested[0]!r}; the fusion attends over single deltas' "
                f"outputs. Put the block around the Fuse instead (e.g. Stack(Fuse('a', 'b', fusion='f'), 'c'))"
            )

    def fields(self) -> dict[str, Any]:
        return {"fusion": self.fusion}

    def fusion_name(self) -> str | None:
        return self.fusion


BLOCK_TYPES: dict[str, type[Block]] = {cls.kind: cls for cls in (Stack, Parallel, Average, BatchSplit, Fuse)}


def block_from_dict(data: dict[str, Any]) -> Block:
    """A block from its :meth:`Block.to_dict` form.

    Raises:
        ConfigError: an unknown block kind, missing children, or unknown fields.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"a serialised block is a dict with a 'block' field, got {type(data).__name__}")
    data = dict(data)
    kind = data.pop("block", None)
    if kind not in BLOCK_TYPES:
        raise ConfigError(f"unknown block kind {kind!r}; known: {sorted(BLOCK_TYPES)}")
    children = data.pop("children", None)
    if not isinstance(children, list):
        raise ConfigError(f"serialised {kind} block needs a 'children' list, got {children!r}")
    allowed = {"parallel": {"weights"}, "batch_split": {"sizes"}, "fuse": {"fusion"}}.get(kind, set())
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} for a {kind} block; valid: {sorted(allowed) or 'none'}")
    built = [block_from_dict(c) if isinstance(c, dict) else c for c in children]
    return BLOCK_TYPES[kind](*built, **data)


def as_block(block: Block | str) -> Block:
    """A block for ``block``; a lone delta name becomes ``Stack(name)``."""
    if isinstance(block, str):
        return Stack(block)
    if isinstance(block, dict):
        return block_from_dict(block)
    if not isinstance(block, Block):
        raise ConfigError(f"expected a composition block or a delta name, got {type(block).__name__}")
    return block


def row_names(block: Block) -> list[str]:
    """The deltas one row passes through; a delta twice on one row is an error (the
    children of a BatchSplit serve different rows, so they may repeat names)."""
    if isinstance(block, BatchSplit):
        seen: set[str] = set()
        for child in block.children:
            seen.update(row_names(child) if isinstance(child, Block) else [child])
        return sorted(seen)
    names: list[str] = []
    for child in block.children:
        names += row_names(child) if isinstance(child, Block) else [child]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(
            f"delta {repeated[0]!r} appears twice on the same rows in {type(block).__name__}; a delta applies at "
            f"most once per row (only BatchSplit children, which serve different rows, may repeat a name)"
        )
    return names
