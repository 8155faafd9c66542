"""``route_auto``: inputs that name no delta go to deltas the library chooses for them.

Only the library's deltas made for the model's base take part (their recorded fingerprint
is checked against the model, as loading does); they are loaded onto the model on first use
(inactive) and stay there. Two routers:

- ``"centroid"``: each row to the delta whose training examples' mean embedding is nearest
  (:mod:`.centroid`), run as one mixed batch (``dt.route``);
- ``"arrow"``: each token at each adapted module to the ``top_k`` LoRAs its input aligns with
  (:mod:`.arrow`); a row's head is that of the delta it was routed to most.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from ..core.mixing import route
from ..core.slot import get_state
from ..errors import DeltaFileError, FingerprintError, LibraryError
from ..io.artifact import load, read_meta
from ..io.base_check import check_fingerprint
from .arrow import ArrowRouting, arrow
from .centroid import embed, nearest
from .index import Library
from .record import CORRUPT, MISSING, DeltaRecord

ROUTERS = ("centroid", "arrow")


class AutoRoute:
    """What :func:`route_auto` chose: the candidate deltas and each row's delta."""

    def __init__(self, router: str, deltas: tuple[str, ...], choice: list[str] | None = None,
                 plan: ArrowRouting | None = None) -> None:
        self.router = router
        #: the library's deltas for this base, all loaded on the model
        self.deltas = deltas
        self._choice = choice
        self._plan = plan

    @property
    def choice(self) -> list[str]:
        """Each row's delta (Arrow: the one its tokens were routed to most; known after the forward)."""
        return self._plan.choice if self._plan is not None else list(self._choice or [])

    @property
    def votes(self) -> torch.Tensor | None:
        """Arrow only: per row, the routing weight each delta got (summed over modules, averaged over tokens)."""
        return self._plan.votes if self._plan is not None else None


def as_library(library: Library | str | Path) -> Library:
    if isinstance(library, Library):
        return library
    if not Path(library).expanduser().is_file():
        raise LibraryError(f"library {library} does not exist; create it with deltatune library add")
    return Library(library)


def deltas_for_base(model: nn.Module, library: Library, names: Sequence[str] | None = None) -> list[DeltaRecord]:
    """The library's sound deltas made for ``model``'s base (all of ``names`` when given).

    Raises:
        LibraryError: the library (or ``names``) holds no delta, or none for this base (the
            message names the bases they were made for); a named delta is missing or corrupt.
        FingerprintError: a delta named in ``names`` was made for another base.
    """
    records = library.list() if names is None else [library.get(name) for name in names]
    if not records:
        raise LibraryError(f"library {library.db} is empty: there is no delta to route to; add deltas for this base "
                           f"with deltatune library add")
    broken = [r for r in records if r.status in (MISSING, CORRUPT)]
    if names is not None and broken:
        raise LibraryError(f"delta {broken[0].name!r} is {broken[0].status} ({broken[0].problem}); repair or remove it "
                           f"(deltatune library verify / rm)")
    loaded = get_state(model).configs if get_state(model) is not None else {}
    fitting, others = [], []
    for record in records:
        if record.status in (MISSING, CORRUPT):
            continue
        if record.name in loaded:
            fitting.append(record)
            continue
        try:
            check_fingerprint(model, read_meta(record.path), "base")
        except FingerprintError as error:
            if names is not None:
                raise FingerprintError(f"{error} (route only among deltas made for this base)") from None
            others.append(record)
            continue
        fitting.append(record)
    if not fitting:
        bases = sorted({f"{r.model_class} {r.fingerprint[:12]}" for r in others})
        raise LibraryError(
            f"library {library.db} has {len(records)} delta(s) but none for this {type(model).__name__}: they were made "
            f"for {', '.join(bases) or 'nothing readable'}; load the base they were trained on, or add deltas trained "
            f"on this one")
    return fitting


def load_deltas(model: nn.Module, records: Sequence[DeltaRecord], heads: bool = True) -> None:
    """Load every record's delta onto ``model`` (inactive) unless a delta of that name is there."""
    loaded = get_state(model).configs if get_state(model) is not None else {}
    for record in records:
        if record.name in loaded:
            continue
        try:
            load(model, record.path, record.name, activate=False, saved_modules=heads)
        except DeltaFileError as error:
            if isinstance(error, FingerprintError) or not heads:
                raise
            raise LibraryError(f"{error}. If the deltas' heads differ in width from the model's, load their bodies "
                               f"only (heads=False) and apply each row's head yourself (see results/routing.py)") from None


@contextlib.contextmanager
def route_auto(model: nn.Module, library: Library | str | Path, inputs: Mapping[str, torch.Tensor] | None = None, *,
               router: str = "centroid", names: Sequence[str] | None = None, top_k: int = 1,
               heads: bool = True) -> Iterator[AutoRoute]:
    """Inside the block, every row of ``model``'s batches runs through deltas the library chose.

    Args:
        model: the base, with or without deltas; the library's deltas for its base are loaded.
        library: a :class:`Library` or its database file.
        inputs: the tokenised batch (``input_ids``, ``attention_mask``). The centroid router
            embeds it to choose; Arrow uses its attention mask to count each row's tokens.
        router: ``"centroid"`` or ``"arrow"``.
        names: route only among these library deltas (default: all of them for this base).
        top_k: Arrow: how many deltas each token mixes.
        heads: load the deltas' trained module copies (their heads) too.

    Raises:
        LibraryError: an unknown router, an empty library, no delta for this base, no centroids.
        FingerprintError: a delta in ``names`` was made for another base.
        NotApplicableError: Arrow over a delta whose change is not low-rank (named).

    Example:
        >>> batch = tokenizer(texts, padding=True, return_tensors="pt")
        >>> with dt.route_auto(model, "deltas.db", batch) as chosen:
        ...     logits = model(**batch).logits
        >>> chosen.choice            # the delta each row ran through
    """
    if router not in ROUTERS:
        raise LibraryError(f"router must be one of {', '.join(map(repr, ROUTERS))}, got {router!r}")
    library = as_library(library)
    records = deltas_for_base(model, library, names)
    load_deltas(model, records, heads)
    deltas = tuple(r.name for r in records)
    if router == "arrow":
        mask = inputs.get("attention_mask") if inputs is not None else None
        with arrow(model, deltas, top_k, mask) as plan:
            yield AutoRoute(router, deltas, plan=plan)
        return
    if inputs is None:
        raise LibraryError("the centroid router embeds the inputs to choose: pass the tokenised batch as inputs")
    centroids = library.centroids(deltas)
    choice = nearest(embed(model, inputs), centroids)
    with route(model, choice):
        yield AutoRoute(router, tuple(centroids), choice=choice)
