"""Trainable-parameter counts computed from the adapted modules' shapes, by hand."""

from __future__ import annotations

from torch import nn


def _linear(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return module.num_embeddings, module.embedding_dim
    fan_in, fan_out = module.weight.shape  # GPT-2 Conv1D stores (in, out)
    return fan_in, fan_out


def _block(module: nn.Module) -> tuple[int, int]:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"]
    return _linear(linears[0])[0], _linear(linears[-1])[1]


#: closed forms of methods added after the founding six: method -> f(model, config, modules);
#: a method's own test module adds its entry with :func:`closed_form`
FORMULAS: dict = {}


def closed_form(method: str):
    """Register ``f(model, config, modules) -> count`` as ``method``'s closed-form count."""
    def register(function):
        FORMULAS[method] = function
        return function
    return register


def expected_parameters(method: str, model: nn.Module, config, modules: list[str]) -> int:
    get = model.get_submodule
    if method in FORMULAS:
        return FORMULAS[method](model, config, modules)
    if method == "lora":
        return sum(config.r * sum(_linear(get(p))) for p in modules)
    if method == "dora":
        return sum(config.r * sum(_linear(get(p))) + _linear(get(p))[1] for p in modules)
    if method == "ia3":
        from deltatune.core.targeting import pattern_matches

        feedforward = config.feedforward
        if feedforward is None:
            from deltatune.core.roles import default_targets

            feedforward = default_targets(model, ["ffn_down"], "ia3") if config.targets is None and not config.target_types else ()
        return sum(_linear(get(p))[0 if any(pattern_matches(f, p) for f in feedforward) else 1] for p in modules)
    if method == "bitfit":
        return sum(get(p).bias.numel() for p in modules)
    if method == "adapter":
        b = config.bottleneck
        total = 0
        for p in modules:
            fan_in, fan_out = _block(get(p)) if not hasattr(get(p), "weight") else _linear(get(p))
            d_in = fan_in if config.placement == "parallel" else fan_out
            total += d_in * b + b + b * fan_out + fan_out
        return total
    if method == "prompt":
        return config.num_virtual_tokens * model.get_input_embeddings().embedding_dim
    if method == "prefix":
        c = model.config
        heads = c.num_attention_heads
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        head_dim = getattr(c, "head_dim", None) or getattr(c, "d_kv", None) or c.hidden_size // heads
        layers = len([p for p in modules if p])
        assert config.projection_dim == 0
        return config.num_virtual_tokens * layers * 2 * kv_heads * head_dim
    if method == "head":
        return 0  # the head's parameters are counted as a saved module, see below
    if method == "dense":  # a full difference for each adapted weight (and bias, if asked)
        return sum((get(p).weight.numel() if config.weight else 0)
                   + (get(p).bias.numel() if config.bias and get(p).bias is not None else 0) for p in modules)
    raise AssertionError(f"no closed-form parameter count for method {method!r}: add one to tests/closed_form.py "
                         f"(decorate a function with @closed_form({method!r}) in a module this file imports)")


from closed_forms import *  # noqa: E402,F401,F403  (each new method's formula, registered on import)
