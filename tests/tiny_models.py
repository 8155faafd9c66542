"""Tiny models built from random configs (no downloads) and inputs for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import transformers
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.fc2(self.act(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(h).flatten(1))


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, num_labels=3,
    )
    return transformers.BertForSequenceClassification(config)


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
    )
    return transformers.LlamaForCausalLM(config)


def _t5() -> nn.Module:
    config = transformers.T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(config)


def _text_inputs(seq2seq: bool = False) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    ids = torch.randint(1, 100, (3, 7), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # one padded row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(1, 100, (3, 4), generator=generator)
    return inputs


@dataclass(frozen=True)
class ModelCase:
    name: str
    factory: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    #: plain torch model: methods need explicit targets (no model-family defaults)
    generic: bool = False

    def build(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        return self.factory().eval()

    def output(self, model: nn.Module, inputs: dict | None = None) -> torch.Tensor:
        inputs = self.inputs() if inputs is None else inputs
        if self.generic:
            return model(inputs["x"])
        out = model(**inputs)
        return out.logits


MODELS = {
    "mlp": ModelCase("mlp", MLP, lambda: {"x": torch.randn(4, 8, generator=torch.Generator().manual_seed(1))}, True),
    "cnn": ModelCase("cnn", CNN, lambda: {"x": torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))}, True),
    "bert": ModelCase("bert", _bert, _text_inputs),
    "gpt2": ModelCase("gpt2", _gpt2, _text_inputs),
    "llama": ModelCase("llama", _llama, _text_inputs),
    "t5": ModelCase("t5", _t5, lambda: _text_inputs(seq2seq=True)),
}

#: small sizes for any config field of these names, so every method stays tiny
SMALL = {"r": 4, "bottleneck": 8, "num_virtual_tokens": 3}


def small_config(method: str, case: ModelCase, **overrides):
    """The method's default config at test size; plain models get targets by type."""
    import dataclasses

    import deltatune as dt

    cls = dt.get_method(method).config_class
    names = {f.name for f in dataclasses.fields(cls)}
    fields = {k: v for k, v in SMALL.items() if k in names}
    if case.generic and method not in ("bitfit",) and "target_types" in names:
        fields["target_types"] = ("Linear",)
    fields.update(overrides)
    return cls(**fields)
