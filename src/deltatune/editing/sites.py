"""Where an edit acts: each block's feed-forward down projection (role ``ffn_down``), the
subject's last token in tokenised prompts, and reading a module's inputs and outputs there."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..core.roles import DESCRIPTIONS, find_roles
from ..core.shapes import linear_shape
from ..errors import ConfigError, TargetError
from .facts import SLOT

#: the contexts a key and a value are averaged over: the prompt alone and behind short prefixes
#: (ROME averages over generated prefixes; fixed ones keep an edit reproducible)
CONTEXTS = ("", "Here is a fact.", "As everyone knows,")


@dataclass(frozen=True)
class Site:
    """One editable layer: a block's down projection, its index among them and its layout."""

    index: int
    path: str
    block: str
    #: GPT-2 ``Conv1D``: the weight is stored ``(in, out)``
    fan_in_fan_out: bool


def edit_sites(model: nn.Module) -> list[Site]:
    """Every block's feed-forward down projection, in model order, found from the structure."""
    roles = find_roles(model)
    paths = roles.roles.get("ffn_down", [])
    if not paths:
        raise TargetError(f"{type(model).__name__} has no {DESCRIPTIONS['ffn_down']} in its transformer blocks; "
                          f"ROME and MEMIT edit that layer, so they need a transformer with Linear/Conv1D MLPs")
    out = []
    for index, path in enumerate(paths):
        shape = linear_shape(model.get_submodule(path))
        out.append(Site(index, path, roles.block_of[path], bool(shape and shape[2])))
    return out


def resolve_layers(model: nn.Module, layers: Sequence[int] | None, default: Sequence[int]) -> list[Site]:
    """The sites of ``layers`` (block indices; negative counts from the end), or of ``default``."""
    sites = edit_sites(model)
    chosen = list(default if layers is None else layers)
    if not chosen:
        raise TargetError("no layer to edit; pass --layers with at least one block index")
    out = []
    for layer in chosen:
        if not isinstance(layer, int) or not -len(sites) <= layer < len(sites):
            raise TargetError(f"layer {layer!r} is not a block of {type(model).__name__}: it has {len(sites)} blocks "
                              f"with a feed-forward down projection (0..{len(sites) - 1}); pass --layers within that range")
        out.append(sites[layer])
    if len({s.index for s in out}) != len(out):
        raise TargetError(f"layers {chosen} name a block twice; list each block once")
    return sorted(out, key=lambda s: s.index)


def default_layers(model: nn.Module, count: int) -> list[int]:
    """``count`` consecutive blocks ending a fifth of the way in (ROME's and MEMIT's early-middle
    MLPs), never the final block (an edit there cannot reach a later token's prediction)."""
    blocks = len(edit_sites(model))
    last = min(max(blocks - 2, 0), max(count - 1, round(blocks * 0.2)))
    return list(range(max(0, last - count + 1), last + 1))


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class Prompt:
    """A tokenised prompt, the index of the subject's last token, and target ids after it."""

    ids: list[int]
    subject_index: int
    target: list[int]


def subject_prompt(tokenizer, template: str, subject: str, prefix: str = "", target: str | None = None) -> Prompt:
    """``prefix + template`` with the subject in place, tokenised; the subject must end on a token boundary."""
    before, after = template.split(SLOT, 1)
    head = f"{prefix} {before}" if prefix else before
    through_subject = _ids(tokenizer, head + subject)
    full = _ids(tokenizer, head + subject + after)
    if not through_subject or full[:len(through_subject)] != through_subject:
        raise ConfigError(f"the subject {subject!r} does not end on a token boundary in {template!r}: the tokenizer "
                          f"merges it with the text after it; put a space or punctuation after {{}}")
    ids = target_ids(tokenizer, target) if target is not None else []
    return Prompt(full, len(through_subject) - 1, ids)


def target_ids(tokenizer, target: str) -> list[int]:
    """The tokens of ``target`` as a continuation after a word (with its leading space)."""
    ids = _ids(tokenizer, target if target[:1].isspace() else " " + target)
    if not ids:
        raise ConfigError(f"the target {target!r} tokenises to nothing; give a word")
    return ids


def batch(prompts: Sequence[Prompt], pad_id: int, with_target: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, right-padded; ``with_target`` appends each target but its last token."""
    rows = [p.ids + (p.target[:-1] if with_target else []) for p in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def first(output):
    """A module's main output (blocks of some families return a tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def capture(model: nn.Module, path: str, rows: torch.Tensor, positions: torch.Tensor, *, inputs: bool) -> Iterator[list]:
    """Collect the module's input (``inputs=True``) or output at ``(rows, positions)`` into the yielded list."""
    found: list[torch.Tensor] = []
    module = model.get_submodule(path)

    def pre(_module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        found.append(x[rows, positions].detach())

    def post(_module, _args, output):
        found.append(first(output)[rows, positions].detach())

    handle = module.register_forward_pre_hook(pre, with_kwargs=True) if inputs else module.register_forward_hook(post)
    try:
        yield found
    finally:
        handle.remove()


@contextlib.contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Evaluation mode with no parameter requiring grad; both restored afterwards."""
    training = model.training
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in grads:
            p.requires_grad_(flag)
        model.train(training)


def mean_at_subject(model: nn.Module, tokenizer, path: str, prompts: Sequence[Prompt], *, inputs: bool) -> torch.Tensor:
    """The module's input (the key) or output at the subject's last token, averaged over ``prompts``."""
    ids, mask = batch(prompts, pad_id(tokenizer))
    device = next(model.parameters()).device
    rows = torch.arange(len(prompts), device=device)
    positions = torch.tensor([p.subject_index for p in prompts], device=device)
    with capture(model, path, rows, positions, inputs=inputs) as found, torch.no_grad():
        model(input_ids=ids.to(device), attention_mask=mask.to(device))
    return found[0].to(torch.float64).mean(dim=0)


def contexts(tokenizer, template: str, subject: str, target: str | None = None) -> list[Prompt]:
    """The prompt under each of :data:`CONTEXTS`."""
    return [subject_prompt(tokenizer, template, subject, prefix, target) for prefix in CONTEXTS]
