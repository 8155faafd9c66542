"""Zero-init gated attention to learned prompt tokens, one attention layer at a time.

For a layer with queries ``Q`` (after position encoding), prompt tokens ``P`` (``L x H``),
the layer's key and value projections ``W_k, W_v`` (biases included) and output
projection ``W_o``, the layer's output gains

    W_o · concat_heads( g_h · softmax(Q_h (P W_k)_h^T · s) (P W_v)_h )

where ``s`` is the layer's attention scaling (``1/sqrt(head_dim)``) and ``g`` a gate that
starts at zero (one scalar per layer, or one per head). The prompt keys carry no position
encoding, and the softmax over the prompt is separate from the one over the tokens, so the
layer is unchanged while ``g = 0``. Under grouped-query attention the prompt's key/value
heads are repeated like the model's. ``W_o`` is applied without its bias (the module's own
output already has it); where the output projection lies outside the attention module the
unprojected heads are added to the module's output and the model projects them.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...core.build import first_input
from ...core.rows import Routing
from ...core.shapes import linear_shape, weight_as_out_in
from ...core.slot import slot_sites
from ...core.unit import DeltaUnit
from ...errors import MergeError, NotApplicableError
from . import attention
from .attention import AttentionSite

NOT_A_WEIGHT_CHANGE = ("its prompt tokens enter through a separate softmax inside attention, which no change of "
                       "the base weights reproduces")


def _project(module: nn.Module, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """``module``'s linear map of ``x`` (a Linear or GPT-2 ``Conv1D``), computed from its weight so
    that other deltas' hooks on the projection do not run on the prompt."""
    _, _, transposed = linear_shape(module)
    weight = weight_as_out_in(module, transposed)
    return F.linear(x.to(weight.dtype), weight, module.bias if bias else None)


class GatedPrompt(DeltaUnit):
    """One attention layer's zero-init gated attention to prompt tokens; subclasses say where
    the tokens come from (:meth:`tokens`) and own the ``gate``."""

    gate: nn.Parameter

    def __init__(self, site: AttentionSite, heads: int, gate_per_head: bool):
        super().__init__()
        self.site = site
        self.heads = heads
        self.gate = nn.Parameter(torch.zeros(heads if gate_per_head else 1))
        #: a fused projection's output order ("blocks" or "heads"), read from the first call
        self.layout: str | None = None

    def tokens(self) -> torch.Tensor:
        """The prompt tokens ``(L, hidden)`` this layer attends to."""
        raise NotImplementedError

    def _split_fused(self, projected: torch.Tensor, head_dim: int, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(..., kv_heads * head_dim)`` of a fused projection's output."""
        if layout == "heads":  # GPT-NeoX: [q_h, k_h, v_h] for each head in turn
            _, keys, values = projected.view(*projected.shape[:-1], self.heads, 3 * head_dim).chunk(3, dim=-1)
            return keys.flatten(-2), values.flatten(-2)
        queries = self.heads * head_dim  # GPT-2, BigCode, Phi-3, ModernBERT: [queries | keys | values]
        width = (projected.shape[-1] - queries) // 2
        return projected[..., queries:queries + width], projected[..., queries + width:]

    def _fused_layout(self, module: nn.Module, args: tuple, kwargs: dict, value: torch.Tensor) -> str:
        """How the fused projection orders its outputs: the layout whose values equal the values
        the model computed in this call (checked once)."""
        if self.layout is not None:
            return self.layout
        hidden = kwargs.get("hidden_states", first_input(args, kwargs))
        _, kv_heads, _, head_dim = value.shape
        length = hidden.shape[1]
        computed = value[:1, :, -length:].transpose(1, 2).reshape(1, length, kv_heads * head_dim)
        candidates = ("blocks", "heads") if kv_heads == self.heads else ("blocks",)
        tolerance = max(1e-4, 16 * torch.finfo(computed.dtype).eps)  # the same product, up to the dtype's rounding
        with torch.no_grad():
            projected = _project(module.get_submodule(self.site.key), hidden[:1])
            for layout in candidates:
                if torch.allclose(self._split_fused(projected, head_dim, layout)[1].to(computed.dtype), computed,
                                  rtol=tolerance, atol=tolerance):
                    self.layout = layout
                    return layout
        raise NotApplicableError(
            f"{type(self).__name__} at {self.site.path}: the fused projection {self.site.key!r} orders its outputs "
            f"neither as [queries | keys | values] nor per head as [q, k, v]; its keys and values cannot be read")

    def prompt_key_value(self, module: nn.Module, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt's keys and values, ``(kv_heads, L, head_dim)`` each."""
        prompt = self.tokens()
        if self.site.fused:
            projected = _project(module.get_submodule(self.site.key), prompt)
            keys, values = self._split_fused(projected, head_dim, self.layout or "blocks")
        else:
            keys = _project(module.get_submodule(self.site.key), prompt)
            values = _project(module.get_submodule(self.site.value), prompt)
        split = lambda t: t.view(t.shape[0], -1, head_dim).transpose(0, 1)  # noqa: E731
        return split(keys), split(values)

    def contribution(self, module: nn.Module, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """What the gated prompt adds to the module's output for queries ``(batch, heads, tokens, head_dim)``."""
        batch, heads, length, head_dim = query.shape
        keys, values = self.prompt_key_value(module, head_dim)
        repeat = heads // keys.shape[0]
        keys, values = keys.repeat_interleave(repeat, 0), values.repeat_interleave(repeat, 0)
        scores = torch.matmul(query, keys.transpose(-1, -2).to(query.dtype)) * scaling
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        weights = self.gate.to(query.dtype).view(-1, 1, 1) * weights
        heads_out = torch.matmul(weights, values.to(query.dtype)).transpose(1, 2).reshape(batch, length, -1)
        if self.site.output is not None:
            return _project(module.get_submodule(self.site.output), heads_out, bias=False)
        return heads_out

    def forward_post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        query, scaling, value = attention.recorded_query(module)
        if self.site.fused:
            self._fused_layout(module, args, kwargs, value)
        states = output[0] if isinstance(output, tuple) else output
        changed = states + self.contribution(module, query, scaling).to(states.dtype)
        return (changed, *output[1:]) if isinstance(output, tuple) else changed

    def run(self, module: nn.Module, own: Any, args: tuple, kwargs: dict) -> Any:
        output = self.forward_post(module, args, kwargs, own(*args, **kwargs))
        module.__dict__.pop(attention.QUERY_ATTR, None)  # do not keep the query (and its graph) alive
        return output

    @classmethod
    def mixed_post(cls, units: list[DeltaUnit | None], module: nn.Module, args: tuple, kwargs: dict, output: Any,
                   routing: Routing) -> Any:
        """Each delta's gated prompt on its own rows (prompt lengths may differ between deltas)."""
        query, scaling, value = attention.recorded_query(module)
        for unit in units:
            if unit is not None and unit.site.fused:
                unit._fused_layout(module, args, kwargs, value)
        states = output[0] if isinstance(output, tuple) else output
        routing.check_batch(states.shape[0], type(module).__name__)
        result = states
        for position, unit in enumerate(units):
            rows = routing.rows_of(position).to(states.device) if unit is not None else None
            if rows is None or rows.numel() == 0:
                continue
            extra = unit.contribution(module, query.index_select(0, rows), scaling)
            result = result.index_add(0, rows, extra.to(result.dtype))
        return (result, *output[1:]) if isinstance(output, tuple) else result

    def merge_params(self, module: nn.Module, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise MergeError(f"{type(self).__name__} cannot be merged: {NOT_A_WEIGHT_CHANGE}")

    def attached(self, module: nn.Module, model: nn.Module) -> None:
        attention.switch_on(module)

    def detached(self, module: nn.Module, model: nn.Module) -> None:
        remaining = [m for _, m, slot in slot_sites(model) for u in slot.values() if isinstance(u, GatedPrompt)]
        if not any(m is module for m in remaining):
            module.__dict__.pop(attention.QUERY_ATTR, None)
        if not any(getattr(m, "config", None) is module.config for m in remaining):
            attention.switch_off(module)


class AdaptionPrompt(GatedPrompt):
    """LLaMA-Adapter's unit: this layer's own adaption prompt (``adapter_len x hidden``) and gate."""

    def __init__(self, site: AttentionSite, heads: int, hidden: int, adapter_len: int, gate_per_head: bool):
        super().__init__(site, heads, gate_per_head)
        # the official code draws the prompts from an nn.Embedding: standard normal
        self.prompt = nn.Parameter(torch.randn(adapter_len, hidden))

    def tokens(self) -> torch.Tensor:
        return self.prompt
