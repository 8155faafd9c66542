"""The roles of a transformer's modules, found from its structure, and default targets from them.

Roles: ``q k v`` (separate attention projections), ``qkv`` (one fused projection), ``o`` (the
attention output projection), ``ffn_up`` (hidden -> intermediate; a fused gate-and-up too),
``ffn_gate`` (the gate of a gated feed-forward), ``ffn_down`` (intermediate -> hidden: its
input is the feed-forward inner activation) and ``ffn_block`` (the whole feed-forward module).

How they are found, with no table of model families:

1. Blocks. The outermost ``nn.ModuleList`` / ``nn.Sequential`` whose elements hold an attention
   sub-block is the stack of layers; its elements are the blocks (an element that is itself a
   list of repeated blocks, as in Funnel or ``[encoder, decoder]``, is opened).
2. Attention sub-blocks of a block: its outermost descendants whose class name or attribute
   name says attention (``...Attention``, ``attn``) and that hold a Linear or GPT-2 ``Conv1D``.
   The first one is the self-attention; later ones attend to an encoder (T5 ``EncDecAttention``,
   BART ``encoder_attn``, GPT-2 ``crossattention``) and get no role, as in deltatune's earlier
   family table (``targets="all-linear"`` does cover them).
3. In the self-attention, against the hidden width ``H`` (the config's ``hidden_size``, else the
   input embedding width): ``o`` is the projection that writes ``H``; the projections reading
   ``H`` are ``qkv`` when there is one, wider than ``o``'s input (``q + 2 kv``), else ``q, k, v``,
   where ``q`` is the one whose width differs from the other two (grouped-query attention).
4. Outside the attention sub-blocks: ``ffn_down`` maps an intermediate width back to ``H``;
   ``ffn_up`` maps ``H`` to that intermediate width (or twice it: fused gate and up), so a
   mixture-of-experts router (``H -> experts``) is not taken; of two such projections side by
   side the gate is ``ffn_gate``. ``ffn_block`` is the smallest module holding all of them.
   Feed-forward weights that are not Linear/Conv1D modules (fused 3-D expert tensors) have no role.

Where shapes cannot tell projections apart (square ``q``/``k``/``v``/``o``, two equal gate and up
projections), the attribute names break the tie (``q_proj``, ``query``, ``out_proj``, ``gate``),
then the registration order (``q, k, v`` first, ``o`` last, gate before up).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from ..errors import TargetError
from .shapes import linear_shape
from .targeting import base_modules, pattern_matches

#: every role, with what it is (for error messages)
DESCRIPTIONS = {
    "q": "the attention query projection (role 'q')",
    "k": "the attention key projection (role 'k')",
    "v": "the attention value projection (role 'v')",
    "qkv": "a fused query-key-value projection (role 'qkv')",
    "o": "the attention output projection (role 'o')",
    "ffn_up": "the feed-forward up projection, hidden -> intermediate (role 'ffn_up')",
    "ffn_gate": "the feed-forward gate projection (role 'ffn_gate')",
    "ffn_down": "the feed-forward down projection, intermediate -> hidden (role 'ffn_down')",
    "ffn_block": "a module holding the whole feed-forward block (role 'ffn_block')",
}
ROLES = tuple(DESCRIPTIONS)

#: role patterns for model types whose structure the rules above read wrongly; each entry says
#: why. Empty: every architecture tested (tests/test_architectures.py) is read from its structure.
OVERRIDES: dict[str, dict[str, str]] = {}

_ATTENTION_WORDS = ("attention", "attn")
_CROSS_WORDS = ("cross", "encdec", "encoder_attn")
_NAME_HINTS = {
    "q": {"q", "query", "wq"},
    "k": {"k", "key", "wk"},
    "v": {"v", "value", "wv"},
    "o": {"o", "out", "output", "wo", "dense"},
    "gate": {"gate", "w1"},
}


@dataclass(frozen=True)
class _Linear:
    path: str
    fan_in: int
    fan_out: int


@dataclass
class ModelRoles:
    """What :func:`find_roles` found: blocks, hidden width, module paths per role.

    Attributes:
        hidden: the hidden width the shapes were read against (``None`` without blocks).
        blocks: paths of the transformer blocks, in model order.
        roles: role -> module paths, in model order.
        block_of: module path -> the path of its block.
        linears: every Linear / Conv1D inside a block, in model order (``targets="all-linear"``).
        names: every module name of the model (deltatune's own modules left out).
    """

    hidden: int | None
    blocks: list[str] = field(default_factory=list)
    roles: dict[str, list[str]] = field(default_factory=dict)
    block_of: dict[str, str] = field(default_factory=dict)
    linears: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    def patterns(self, paths: list[str]) -> list[str]:
        """Targeting patterns that select exactly ``paths``: one ``re:`` pattern per
        block-relative path where it matches exactly those modules, else one per path."""
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for path in paths:
            block = self.block_of[path]
            groups[(block.rpartition(".")[0], path[len(block):])].append(path)
        out = []
        for (stack, rest), members in groups.items():
            pattern = "re:" + re.escape(stack) + r"\.\d+" + re.escape(rest)
            if {n for n in self.names if pattern_matches(pattern, n)} == set(members):
                out.append(pattern)
            else:
                out += ["re:" + re.escape(p) for p in members]
        return out


class _Tree:
    """The model's modules (deltatune's slots left out) by parent path."""

    def __init__(self, model: nn.Module):
        self.children: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
        self.modules: dict[str, nn.Module] = {}
        for path, module in base_modules(model):
            self.modules[path] = module
            if path:
                self.children[path.rpartition(".")[0]].append((path, module))

    def below(self, path: str) -> list[tuple[str, nn.Module]]:
        """Descendants of ``path``, in registration order."""
        out = []
        for child_path, child in self.children.get(path, ()):
            out.append((child_path, child))
            out += self.below(child_path)
        return out

    def linears(self, path: str) -> list[_Linear]:
        out = []
        for child_path, child in self.below(path):
            shape = linear_shape(child)
            if shape is not None:
                out.append(_Linear(child_path, shape[0], shape[1]))
        return out


def _leaf(path: str) -> str:
    return path.rpartition(".")[2].lower()


def _is_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def _says_attention(path: str, module: nn.Module) -> bool:
    names = (type(module).__name__.lower(), _leaf(path))
    return any(word in name for word in _ATTENTION_WORDS for name in names)


def _attention_blocks(tree: _Tree, path: str) -> list[str]:
    """Outermost strict descendants of ``path`` that say attention and hold a linear layer."""
    found = []
    for child_path, child in tree.children.get(path, ()):
        if linear_shape(child) is None and _says_attention(child_path, child) and tree.linears(child_path):
            found.append(child_path)
        else:
            found += _attention_blocks(tree, child_path)
    return found


def _repeats_blocks(tree: _Tree, path: str) -> bool:
    """Whether ``path`` holds a list of two or more blocks of one class (a group of blocks)."""
    for child_path, child in tree.below(path):
        if _is_container(child):
            classes = [type(m) for p, m in tree.children.get(child_path, ()) if _attention_blocks(tree, p)]
            if any(classes.count(c) > 1 for c in classes):
                return True
    return False


def _stack_blocks(tree: _Tree, stack: str) -> list[str]:
    out = []
    for path, element in tree.children.get(stack, ()):
        if _is_container(element):
            out += _stack_blocks(tree, path)
        elif _repeats_blocks(tree, path):
            out += _find_blocks(tree, path)
        elif _attention_blocks(tree, path):
            out.append(path)
    return out


def _find_blocks(tree: _Tree, path: str = "") -> list[str]:
    out = []
    for child_path, child in tree.children.get(path, ()):
        if _is_container(child) and any(_attention_blocks(tree, p) for p, _ in tree.children.get(child_path, ())):
            out += _stack_blocks(tree, child_path)
        else:
            out += _find_blocks(tree, child_path)
    return out


def _hidden_width(model: nn.Module, tree: _Tree, blocks: list[str]) -> int | None:
    config = getattr(model, "config", None)
    if config is not None and callable(getattr(config, "get_text_config", None)):
        config = config.get_text_config()
    hidden = getattr(config, "hidden_size", None)
    if isinstance(hidden, int):
        return hidden
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    if isinstance(embeddings, nn.Embedding):
        return embeddings.embedding_dim
    widths = [lin.fan_in for block in blocks for lin in tree.linears(block)]
    return max(set(widths), key=widths.count) if widths else None


def _hint(path: str, within: str) -> str | None:
    """The role the attribute names below ``within`` suggest for ``path``, if exactly one."""
    tokens = set(re.split(r"[^a-z0-9]+", path[len(within):].lower()))
    roles = [role for role, words in _NAME_HINTS.items() if tokens & words]
    return roles[0] if len(roles) == 1 else None


def _attention_roles(linears: list[_Linear], within: str, hidden: int) -> dict[str, list[str]]:
    writers = [lin for lin in linears if lin.fan_out == hidden]
    if not writers:
        return {}
    named = [lin for lin in writers if _hint(lin.path, within) == "o"]
    out_projection = named[0] if len(named) == 1 else writers[-1]
    readers = [lin for lin in linears if lin.fan_in == hidden and lin is not out_projection]
    roles = {"o": [out_projection.path]}
    if len(readers) == 1 and readers[0].fan_out > out_projection.fan_in:
        roles["qkv"] = [readers[0].path]
    elif len(readers) >= 3:
        hints = {lin.path: _hint(lin.path, within) for lin in readers}
        named = sorted(filter(None, (hints[lin.path] for lin in readers[:3]))) == ["k", "q", "v"]
        if len(readers) == 3 or named:  # more: q, k, v come first (DeBERTa's position projections follow)
            roles.update(_query_key_value(readers[:3], hints, named))
    return roles


def _query_key_value(readers: list[_Linear], hints: dict[str, str | None], named: bool) -> dict[str, list[str]]:
    """``q``, ``k``, ``v`` among three projections of the hidden state: by width, names, order."""
    widths = [lin.fan_out for lin in readers]
    odd = [lin for lin in readers if widths.count(lin.fan_out) == 1]
    if len(odd) == 1:  # grouped-query attention: keys and values share a narrower width
        query, pair = odd[0], [lin for lin in readers if lin is not odd[0]]
        key, value = sorted(pair, key=lambda lin: hints[lin.path] == "v")
    elif named:
        query, key, value = sorted(readers, key=lambda lin: "qkv".index(hints[lin.path]))
    else:
        query, key, value = readers
    return {"q": [query.path], "k": [key.path], "v": [value.path]}


def _feedforward_roles(tree: _Tree, block: str, linears: list[_Linear], hidden: int,
                       attention_paths: list[str]) -> dict[str, list[str]]:
    downs = [lin for lin in linears if lin.fan_out == hidden and lin.fan_in != hidden]
    inner = {lin.fan_in for lin in downs}
    ups = [lin for lin in linears if lin.fan_in == hidden and lin.fan_out != hidden
           and (lin.fan_out in inner or (lin.fan_out % 2 == 0 and lin.fan_out // 2 in inner))]
    if not downs:  # an intermediate as wide as the hidden state: by order, up first, down last
        square = [lin for lin in linears if lin.fan_in == lin.fan_out == hidden]
        ups, downs = (square[:-1], square[-1:]) if len(square) > 1 else ([], [])
    if not downs or not ups:
        return {"ffn_down": [lin.path for lin in downs]} if downs else {}
    side_by_side: dict[tuple[str, int], list[_Linear]] = defaultdict(list)
    for lin in ups:
        side_by_side[(lin.path.rpartition(".")[0], lin.fan_out)].append(lin)
    roles: dict[str, list[str]] = {"ffn_up": [], "ffn_gate": [], "ffn_down": [lin.path for lin in downs]}
    for (parent, _), group in side_by_side.items():
        if len(group) == 2:
            named = [lin for lin in group if _hint(lin.path, parent) == "gate"]
            gate = named[0] if len(named) == 1 else group[0]
            roles["ffn_gate"].append(gate.path)
            roles["ffn_up"] += [lin.path for lin in group if lin is not gate]
        else:
            roles["ffn_up"] += [lin.path for lin in group]
    parts = [lin.path.split(".") for lin in ups + downs]
    common = []
    for column in zip(*parts):
        if len(set(column)) > 1:
            break
        common.append(column[0])
    holder = ".".join(common)
    inside_block = holder.startswith(block + ".") and holder not in {lin.path for lin in ups + downs}
    if inside_block and not any(a == holder or a.startswith(holder + ".") for a in attention_paths):
        roles["ffn_block"] = [holder]
    return {role: paths for role, paths in roles.items() if paths}


def find_roles(model: nn.Module) -> ModelRoles:
    """Blocks, hidden width and the modules of each role in ``model``, read from its structure."""
    tree = _Tree(model)
    blocks = _find_blocks(tree)
    hidden = _hidden_width(model, tree, blocks)
    found = ModelRoles(hidden, blocks, names=list(tree.modules))
    roles: dict[str, list[str]] = defaultdict(list)
    for block in blocks:
        attention = _attention_blocks(tree, block)
        crosses = [a for a in attention if any(w in (_leaf(a) + type(tree.modules[a]).__name__).lower()
                                               for w in _CROSS_WORDS)]
        own = next((a for a in attention if a not in crosses), attention[0])
        linears = tree.linears(block)
        in_attention = [lin for lin in linears if any(lin.path.startswith(a + ".") for a in attention)]
        found.linears += [lin.path for lin in linears]
        block_roles = {}
        if hidden is not None:
            block_roles.update(_attention_roles([lin for lin in linears if lin.path.startswith(own + ".")], own, hidden))
            rest = [lin for lin in linears if lin not in in_attention]
            block_roles.update(_feedforward_roles(tree, block, rest, hidden, attention))
        for role, paths in block_roles.items():
            roles[role] += paths
        for path in [lin.path for lin in linears] + block_roles.get("ffn_block", []):
            found.block_of[path] = block
    found.roles = dict(roles)
    return found


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def _no_blocks_message(model: nn.Module, method: str, wanted: str) -> str:
    return (
        f"{method} has no default targets for {type(model).__name__} (model_type {model_type(model)!r}): "
        f"it looks for {wanted} inside transformer blocks (an nn.ModuleList of layers holding an attention "
        f"sub-module with Linear/Conv1D projections) and found no such blocks; pass targets=[...] or target_types=[...]"
    )


def default_targets(model: nn.Module, roles: list[str], method: str) -> tuple[str, ...]:
    """Patterns selecting, for each entry of ``roles``, the modules of the first role the model has.

    Each entry may list alternatives separated by ``|`` (``"q|qkv"``: the query projection, or
    the fused projection where there is no separate one). ``q``, ``k`` and ``v`` fall back to a
    fused ``qkv`` where the model has one, since that projection computes them.

    Raises:
        TargetError: an entry names no role the model has (or the model has no transformer
            blocks); the message says what was looked for, and targets must be given.
    """
    overrides = OVERRIDES.get(model_type(model) or "", {})
    found = find_roles(model)
    patterns: list[str] = []
    for group in roles:
        alternatives = group.split("|")
        fused = ["qkv"] if "qkv" not in alternatives and set(alternatives) & {"q", "k", "v"} else []
        for role in alternatives + fused:
            if role in overrides:
                patterns.append(overrides[role])
                break
            if found.roles.get(role):
                patterns += found.patterns(found.roles[role])
                break
        else:
            wanted = " or ".join(DESCRIPTIONS.get(r, repr(r)) for r in alternatives)
            if not found.blocks:
                raise TargetError(_no_blocks_message(model, method, wanted))
            stacks = sorted({b.rpartition(".")[0] for b in found.blocks})
            raise TargetError(
                f"{method} has no default targets for {type(model).__name__} (model_type {model_type(model)!r}): "
                f"it looks for {wanted}, and the {len(found.blocks)} transformer blocks under {', '.join(map(repr, stacks))} "
                f"(hidden width {found.hidden}) hold none (roles found: {', '.join(sorted(found.roles)) or 'none'}; "
                f"only Linear/Conv1D modules get roles); pass targets=[...] naming the modules to adapt"
            )
    return tuple(dict.fromkeys(patterns))


def all_linear_targets(model: nn.Module, method: str) -> tuple[str, ...]:
    """Patterns selecting every Linear / Conv1D inside the transformer blocks (never a head).

    Raises:
        TargetError: the model has no transformer blocks, or they hold no linear layer.
    """
    found = find_roles(model)
    if not found.linears:
        raise TargetError(_no_blocks_message(model, method, "every Linear/Conv1D (targets='all-linear')"))
    return tuple(found.patterns(found.linears))
