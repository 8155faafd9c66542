"""The model side of the server: one frozen base, a cache of deltas, and batched forward passes.

No HTTP here. An :class:`Engine` is driven from one worker thread (the batcher's), so model
forwards, delta loads and unloads never overlap. Each batch mixes the rows of several requests
and deltas in one forward (``deltatune.route``); rows of deltas that cannot share a batch
(prefix tuning; prompt tuning next to other rows) run in batches of their own.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.mixing import route
from ..core.registry import config_from_dict, get_method
from ..errors import ConfigError, DeltaFileError, LibraryError, DeltaStateError, FingerprintError, NotApplicableError
from ..io.artifact import head_rows
from ..library import deltas_for_base, embed, nearest
from ..swap import DeltaCache, delta_bytes
from ..models.load import CAUSAL_LM, CLASSIFICATION, load_model, model_task
from .errors import ApiError, as_api_error
from .library import AUTO, DeltaLibrary, IndexedDeltas


@dataclass
class Work:
    """One request's rows: the delta they use (``None``: the base; ``"auto"``: chosen by the
    library's centroid router, then replaced by the chosen name) and their texts."""

    delta: str | None
    texts: list[str]
    options: Any = None  # what the task needs besides the texts (a completion's ``Generation``)


Forward = Callable[[list[int], list[Work]], list[Any]]


def head_labels(library: DeltaLibrary) -> int | None:
    """The number of labels most deltas in ``library`` were trained with (from their head tensors)."""
    counts: Counter[int] = Counter()
    for name in library.available():
        try:
            rows = head_rows(library.meta(name))
        except (DeltaFileError, ApiError, OSError):  # a broken delta is reported when it is used, not here
            continue
        if rows is not None:
            counts[rows] += 1
    return counts.most_common(1)[0][0] if counts else None


def load_base(name: str, library: DeltaLibrary, *, num_labels: int | None = None, seed: int = 0,
              quantize: str | None = None):
    """The base model, its tokenizer and its task, ready to serve (eval mode, no grad).

    A classification base gets ``num_labels`` outputs (default: what the deltas' heads have);
    its own head is new and seeded with ``seed``, so base-only answers are reproducible.
    ``quantize`` (``"int8"`` or ``"4bit"``) quantises its Linear layers.
    """
    task = model_task(name)
    if task == CLASSIFICATION:
        torch.manual_seed(seed)
        loaded = load_model(name, task, num_labels or head_labels(library) or 2, quantize=quantize)
    else:
        loaded = load_model(name, task, quantize=quantize)
        loaded.tokenizer.padding_side = "left"
    loaded.model.eval().requires_grad_(False)
    return loaded.model, loaded.tokenizer, task


class Engine:
    """A base model with deltas loaded on demand from a :class:`DeltaLibrary`.

    Args:
        model: the frozen base (a sequence classifier or a causal LM).
        tokenizer: its tokenizer (left padding for causal LMs).
        task: ``"classification"`` or ``"causal_lm"``.
        library: the deltas folder.
        max_deltas: at most this many deltas stay loaded between batches (least recently used
            go first; a batch may hold more while it runs).
        model_name: how responses name the base.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, task: str, library: DeltaLibrary, *, max_deltas: int = 16,
                 model_name: str = "base") -> None:
        self.model, self.tokenizer, self.task, self.library = model, tokenizer, task, library
        self.model_name = model_name
        self.cache = DeltaCache(model, max_deltas=max_deltas)
        self._held: set[str] = set()  # loaded by an admin: pinned until unloaded
        config = getattr(model, "config", None)
        limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
        self.max_length = min(int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000)

    # --- deltas -----------------------------------------------------------------------------

    def load(self, name: str) -> dict[str, Any]:
        """Load delta ``name`` and keep it loaded until :meth:`unload` (admin); a loaded delta is
        swapped in place for its files on disk (hot swap)."""
        reloaded = name in self.cache
        if reloaded:
            with self._as_api_errors(name):
                in_place = self.cache.replace(name, self.library.folder(name)).in_place
        else:
            self._acquire(name)
        if name not in self._held:
            self.cache.pin(name)
            self._held.add(name)
        answer = {"name": name, "loaded": True, "bytes": delta_bytes(self.model, name)}
        return {**answer, "reloaded": reloaded, "in_place": in_place} if reloaded else answer

    def unload(self, name: str) -> dict[str, Any]:
        """Delete delta ``name`` from the model (admin); 404 when it is not loaded."""
        self.library.folder(name)  # 400 for a bad name
        if name not in self.cache:
            raise ApiError(404, "not_loaded", f"delta {name!r} is not loaded; loaded: {self.cache.loaded()}")
        self._held.discard(name)
        self.cache.unpin(name)
        if name in self.cache:
            self.cache.evict(name)
        return {"name": name, "loaded": False}

    def loaded(self) -> list[str]:
        return self.cache.loaded()

    def _acquire(self, name: str) -> None:
        folder = self.library.folder(name)
        with self._as_api_errors(name):
            self.cache.get(name, folder)

    @contextlib.contextmanager
    def _as_api_errors(self, name: str) -> Iterator[None]:
        """A delta of another base becomes a 409 naming the fingerprint it was made for."""
        try:
            yield
        except FingerprintError as error:
            meta = self.library.meta(name)
            raise ApiError(409, "other_base", str(error), fingerprint=meta["base"].get("sha256"),
                           base_class=meta["base"].get("model_class")) from None

    # --- batches ----------------------------------------------------------------------------

    def run(self, works: Sequence[Work], forward: Forward) -> list[Any]:
        """``forward`` over the works' rows in as few mixed batches as their deltas allow.

        Returns one entry per work: what ``forward`` gave it, or the exception that stopped it
        (an unknown or unloadable delta fails only the works that name it).
        """
        results: list[Any] = [None] * len(works)
        auto = [i for i, work in enumerate(works) if work.delta == AUTO]
        if auto:
            try:
                for i, name in zip(auto, self.auto_deltas([works[i].texts for i in auto])):
                    works[i].delta = name
            except Exception as error:  # noqa: BLE001 - reported to those works
                for i in auto:
                    results[i] = as_api_error(error)
        pinned = []
        for name in dict.fromkeys(w.delta for i, w in enumerate(works) if w.delta is not None and results[i] is None):
            try:
                self._acquire(name)
                if name not in self._held:
                    self.cache.pin(name)
                    pinned.append(name)
            except Exception as error:  # noqa: BLE001 - reported to the works that named it
                for i, work in enumerate(works):
                    if work.delta == name and results[i] is None:
                        results[i] = as_api_error(error)
        try:
            todo = [i for i, r in enumerate(results) if r is None]
            for group in self._groups(todo, works):
                self._forward_group(group, works, forward, results)
        finally:
            for name in pinned:
                self.cache.unpin(name)
        return results

    def auto_deltas(self, texts: list[list[str]]) -> list[str]:
        """For each list of texts, the delta chosen by the centroid router: the library delta for
        this base whose training examples' centroid is nearest (cosine) to the texts' mean
        embedding. One forward pass embeds every text.

        Raises:
            ApiError: 400 when the server has no library (``--deltas``), or no delta of it for
                this base has a centroid.
        """
        index = getattr(self.library, "index", None)
        if index is None:
            raise ApiError(400, "no_router", f"model {AUTO!r} routes among a library's deltas by their training "
                                             f"examples' centroids; start the server with --library DB")
        try:
            candidates = [r.name for r in deltas_for_base(self.model, index)]
        except LibraryError as error:
            raise ApiError(400, "no_router", str(error)) from None
        centroids = index.centroids(candidates)
        if not centroids:
            raise ApiError(400, "no_router", f"no delta of library {index.db} for this base has a centroid; store them "
                                             f"with deltatune library centroid NAME --model ... --data ...")
        flat = [text for group in texts for text in group]
        batch = self.tokenizer(flat, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        rows = embed(self.model, batch).split([len(group) for group in texts])
        return nearest(torch.stack([row.mean(0) for row in rows]), centroids)

    def _groups(self, todo: list[int], works: Sequence[Work]) -> list[list[int]]:
        """Works that can share one forward: prefix deltas alone, prompt deltas by prompt length."""
        groups: dict[tuple, list[int]] = {}
        for i in todo:
            groups.setdefault(self._mix_key(works[i].delta), []).append(i)
        return list(groups.values())

    def _mix_key(self, name: str | None) -> tuple:
        """Works with equal keys share a batch; the method declares how its rows mix."""
        if name is None:
            return ("mixed",)
        config = config_from_dict(self.library.meta(name)["config"])
        return get_method(config.method).batch_key(name, config)

    def _forward_group(self, group: list[int], works: Sequence[Work], forward: Forward, results: list[Any]) -> None:
        try:
            outputs = forward(group, [works[i] for i in group])
        except (NotApplicableError, DeltaStateError) as error:
            by_delta: dict[str | None, list[int]] = {}
            for i in group:
                by_delta.setdefault(works[i].delta, []).append(i)
            if len(by_delta) == 1:  # the delta cannot run even alone
                for i in group:
                    results[i] = as_api_error(error)
                return
            for part in by_delta.values():  # these deltas cannot share a batch: one batch each
                self._forward_group(part, works, forward, results)
            return
        except Exception as error:  # noqa: BLE001 - the group's requests fail, the server goes on
            for i in group:
                results[i] = as_api_error(error)
            return
        for i, output in zip(group, outputs):
            results[i] = output

    def routed(self, deltas: list[str | None]):
        """The context that runs row ``i`` through ``deltas[i]`` (nothing when all rows use the base)."""
        if all(d is None for d in deltas):
            return contextlib.nullcontext()
        return route(self.model, deltas)

    def check_lengths(self, texts: list[str], extra: int = 0, special: bool = True) -> list[list[int]]:
        """Token ids of ``texts``; 413 naming the limit when one (plus ``extra`` tokens) is too long.
        ``special``: add the tokenizer's special tokens (a rendered chat template has them already)."""
        ids = self.tokenizer(texts, add_special_tokens=special)["input_ids"]
        for position, row in enumerate(ids):
            if len(row) + extra > self.max_length:
                more = f" plus {extra} new tokens" if extra else ""
                raise ApiError(413, "input_too_long",
                               f"input {position} has {len(row)} tokens{more}; the model takes at most "
                               f"{self.max_length}; shorten it{' or ask for fewer max_tokens' if extra else ''}",
                               limit=self.max_length)
        return ids

    # --- classification ---------------------------------------------------------------------

    def classify(self, works: Sequence[Work]) -> list[Any]:
        """Label and class probabilities of every text; one list per work (or its error)."""
        if self.task != CLASSIFICATION:
            raise ApiError(400, "wrong_task", "this server runs a causal LM; use /v1/completions")
        results: list[Any] = [None] * len(works)
        ready = []
        for i, work in enumerate(works):
            try:
                self.check_lengths(work.texts)
                ready.append(i)
            except ApiError as error:
                results[i] = error
        # "auto" chooses a delta for each text: such a request runs as one work per text (the works
        # still share mixed batches), and each answer row names the delta that answered it
        parts, owners = [], []
        for i in ready:
            work = works[i]
            pieces = [Work(AUTO, [text]) for text in work.texts] if work.delta == AUTO else [work]
            parts += pieces
            owners += [i] * len(pieces)
        outputs = self.run(parts, self._classify_group)
        for i in ready:
            results[i] = []
        for i, part, output in zip(owners, parts, outputs):
            if not isinstance(results[i], list):
                continue  # an earlier text of this request failed: its error is the answer
            if not isinstance(output, list):
                results[i] = output
            elif part is works[i]:
                results[i] = output
            else:
                results[i] += [{**row, "delta": part.delta} for row in output]
        for i in ready:  # a request whose texts all went to one delta names it, as a named request would
            chosen = {row["delta"] for row in results[i]} if isinstance(results[i], list) and works[i].delta == AUTO else ()
            if len(chosen) == 1:
                works[i].delta = chosen.pop()
        return results

    @torch.no_grad()
    def _classify_group(self, _: list[int], works: list[Work]) -> list[list[dict]]:
        texts = [text for work in works for text in work.texts]
        deltas = [work.delta for work in works for _ in work.texts]
        batch = self.tokenizer(texts, padding=True, return_tensors="pt")
        device = next(self.model.parameters()).device
        with self.routed(deltas):
            logits = self.model(**{k: v.to(device) for k, v in batch.items()}).logits
        probabilities = torch.softmax(logits.float(), dim=-1).cpu()
        out, row = [], 0
        for work in works:
            labels = self.label_names(work.delta)
            rows = []
            for p in probabilities[row: row + len(work.texts)].tolist():
                best = max(range(len(p)), key=p.__getitem__)
                rows.append({"label": labels[best], "label_id": best, "probabilities": dict(zip(labels, p))})
            out.append(rows)
            row += len(work.texts)
        return out

    def label_names(self, delta: str | None) -> list[str]:
        """The delta's label names (its ``delta.json``, else its run folder), else the base config's."""
        count = self.model.config.num_labels
        names = self.library.labels(delta) if delta is not None else None
        if names is None or len(names) != count:
            id2label = getattr(self.model.config, "id2label", None) or {}
            names = [str(id2label.get(i, f"LABEL_{i}")) for i in range(count)]
        return names

    # --- description ------------------------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        """The served base: name, task, context length, class."""
        return {"name": self.model_name, "task": self.task, "max_length": self.max_length,
                "model_class": type(self.model).__name__}


def engine_from_options(model: str, deltas: str | Path | None = None, *, library: str | Path | None = None,
                        max_deltas: int = 16, num_labels: int | None = None, seed: int = 0,
                        quantize: str | None = None) -> Engine:
    """An :class:`Engine` for a packaged model name or model folder and its deltas: a deltas
    folder (``deltas``) or a library index (``library``, see ``deltatune library``)."""
    if (deltas is None) == (library is None):
        raise ConfigError("serve takes its deltas from a folder (--deltas DIR) or a library (--library DB): give one")
    library = DeltaLibrary(deltas) if library is None else IndexedDeltas(library)
    base, tokenizer, task = load_base(model, library, num_labels=num_labels, seed=seed, quantize=quantize)
    return Engine(base, tokenizer, task, library, max_deltas=max_deltas, model_name=model)
