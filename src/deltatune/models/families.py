"""Default target modules per model family, by role.

Roles: ``q k v qkv o`` (attention projections; ``qkv`` where they are fused), ``ffn_up``,
``ffn_down`` (whose input is the feed-forward inner activation) and ``ffn_block`` (the whole
feed-forward block, for parallel adapters). Patterns use the targeting syntax.
"""

from __future__ import annotations

from torch import nn

from ..errors import TargetError

_BERT = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_up": "intermediate.dense",
    "ffn_down": r"re:.*\.layer\.\d+\.output\.dense",
}
_LLAMA = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_block": "mlp",
}
FAMILIES: dict[str, dict[str, str]] = {
    "bert": _BERT,
    "roberta": _BERT,
    "gpt2": {
        "qkv": "attn.c_attn",
        "o": "attn.c_proj",
        "ffn_up": "mlp.c_fc",
        "ffn_down": "mlp.c_proj",
        "ffn_block": "mlp",
    },
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "t5": {
        "q": "SelfAttention.q",
        "k": "SelfAttention.k",
        "v": "SelfAttention.v",
        "o": "SelfAttention.o",
        "ffn_up": "DenseReluDense.wi",
        "ffn_down": "DenseReluDense.wo",
        "ffn_block": "DenseReluDense",
    },
}


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def default_targets(model: nn.Module, roles: list[str], method: str) -> tuple[str, ...]:
    """Patterns for the first of each role group the model family has.

    Each entry of ``roles`` may list alternatives separated by ``|`` (``"q|qkv"``: the query
    projection, or the fused projection where there is no separate one).

    Raises:
        TargetError: the family is unknown, so targets must be given.
    """
    family = FAMILIES.get(model_type(model) or "")
    if family is None:
        raise TargetError(
            f"{method} has no default targets for {type(model).__name__} "
            f"(model_type {model_type(model)!r}; known: {', '.join(sorted(FAMILIES))}); "
            f"pass targets=[...] or target_types=[...]"
        )
    patterns = []
    for group in roles:
        for role in group.split("|"):
            if role in family:
                patterns.append(family[role])
                break
    return tuple(dict.fromkeys(patterns))
