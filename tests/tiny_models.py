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


class MixerAttention(nn.Module):
    """Grouped-query attention whose projections have uninformative names, keys first."""

    def __init__(self, hidden: int = 16, heads: int = 4, kv_heads: int = 2) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.p0 = nn.Linear(hidden, kv_heads * self.head_dim)  # keys
        self.p1 = nn.Linear(hidden, kv_heads * self.head_dim)  # values
        self.p2 = nn.Linear(hidden, hidden)  # queries
        self.p3 = nn.Linear(hidden, hidden)  # output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        split = lambda t, n: t.view(batch, seq, n, self.head_dim).transpose(1, 2)  # noqa: E731
        repeat = self.heads // self.kv_heads
        q = split(self.p2(x), self.heads)
        k = split(self.p0(x), self.kv_heads).repeat_interleave(repeat, 1)
        v = split(self.p1(x), self.kv_heads).repeat_interleave(repeat, 1)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.p3(out.transpose(1, 2).reshape(batch, seq, -1))


class Stage(nn.Module):
    def __init__(self, hidden: int = 16) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden)
        self.mix = MixerAttention(hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.expand = nn.Linear(hidden, 3 * hidden)
        self.contract = nn.Linear(3 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(self.norm1(x))
        return x + self.contract(torch.relu(self.expand(self.norm2(x))))


class HomemadeTransformer(nn.Module):
    """A transformer of no known family: no config, its own names for everything."""

    def __init__(self, vocab: int = 50, hidden: int = 16, depth: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, hidden)
        self.stages = nn.ModuleList(Stage(hidden) for _ in range(depth))
        self.readout = nn.Linear(hidden, vocab)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tokens(x)
        for stage in self.stages:
            h = stage(h)
        return self.readout(h)


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
    #: plain torch model without transformer blocks: methods need explicit targets (no default roles)
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

HOMEMADE = ModelCase("homemade", HomemadeTransformer,
                     lambda: {"x": torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(1))}, True)

def _decoder(config_name: str, model_name: str, **fields) -> Callable[[], nn.Module]:
    """A causal LM of a Llama-like config: hidden 32, 2 layers, 4 query and 2 key/value heads."""
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=37, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    fields = {k: v for k, v in {**sizes, **fields}.items() if v is not None}  # None: a field the config lacks
    return lambda: getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))


def _encoder(config_name: str, model_name: str, **fields) -> Callable[[], nn.Module]:
    """A 3-label sequence classifier of a BERT-like config: hidden 32, 2 layers, 4 heads."""
    sizes = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                 max_position_embeddings=64, num_labels=3)
    return lambda: getattr(transformers, model_name)(getattr(transformers, config_name)(**{**sizes, **fields}))


def _build(model_name: str, config_name: str, **fields) -> Callable[[], nn.Module]:
    return lambda: getattr(transformers, model_name)(getattr(transformers, config_name)(**fields))


_GPT = dict(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0)
_SEQ2SEQ = dict(vocab_size=100, d_model=32, decoder_start_token_id=0)
_BART = dict(encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64, bos_token_id=0, eos_token_id=2,
             pad_token_id=1)

#: tiny random models of many transformers architectures (tests/test_architectures.py):
#: encoders as sequence classifiers, decoders as causal LMs, encoder-decoders as seq2seq LMs
ARCHITECTURE_FACTORIES: dict[str, Callable[[], nn.Module]] = {
    "bert": _encoder("BertConfig", "BertForSequenceClassification"),
    "roberta": _encoder("RobertaConfig", "RobertaForSequenceClassification", pad_token_id=1),
    "distilbert": _build("DistilBertForSequenceClassification", "DistilBertConfig", vocab_size=100, dim=32,
                         n_layers=2, n_heads=4, hidden_dim=37, max_position_embeddings=64, num_labels=3),
    # relative attention with separate position projections: five projections read the hidden state
    "deberta-v2": _encoder("DebertaV2Config", "DebertaV2ForSequenceClassification", relative_attention=True,
                           position_buckets=8, pos_att_type=["p2c", "c2p"]),
    "electra": _encoder("ElectraConfig", "ElectraForSequenceClassification", embedding_size=16),
    "albert": _encoder("AlbertConfig", "AlbertForSequenceClassification", embedding_size=16),
    "modernbert": _encoder("ModernBertConfig", "ModernBertForSequenceClassification", pad_token_id=0,
                           bos_token_id=0, eos_token_id=0, cls_token_id=0, sep_token_id=0),
    "gpt2": _build("GPT2LMHeadModel", "GPT2Config", **_GPT),
    "gpt-bigcode": _build("GPTBigCodeForCausalLM", "GPTBigCodeConfig", n_inner=37, **_GPT),
    "gptj": _build("GPTJForCausalLM", "GPTJConfig", rotary_dim=4, n_inner=37, **_GPT),
    "codegen": _build("CodeGenForCausalLM", "CodeGenConfig", rotary_dim=4, n_inner=37, **_GPT),
    "gpt-neox": _decoder("GPTNeoXConfig", "GPTNeoXForCausalLM", num_key_value_heads=None),
    "opt": _build("OPTForCausalLM", "OPTConfig", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                  num_attention_heads=4, ffn_dim=37, max_position_embeddings=64, word_embed_proj_dim=32,
                  bos_token_id=0, eos_token_id=0, pad_token_id=1),
    "bloom": _build("BloomForCausalLM", "BloomConfig", vocab_size=100, hidden_size=32, n_layer=2, n_head=4,
                    bos_token_id=0, eos_token_id=0),
    "falcon": _build("FalconForCausalLM", "FalconConfig", vocab_size=100, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=4, bos_token_id=0, eos_token_id=0),
    "mpt": _build("MptForCausalLM", "MptConfig", vocab_size=100, d_model=32, n_layers=2, n_heads=4, expansion_ratio=2),
    "llama": _decoder("LlamaConfig", "LlamaForCausalLM"),
    "mistral": _decoder("MistralConfig", "MistralForCausalLM"),
    "mixtral": _decoder("MixtralConfig", "MixtralForCausalLM", num_local_experts=2, num_experts_per_tok=1,
                       intermediate_size=64),  # grouped expert matmuls want 16-byte strides
    "qwen2": _decoder("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen2-moe": _decoder("Qwen2MoeConfig", "Qwen2MoeForCausalLM", moe_intermediate_size=16,
                          shared_expert_intermediate_size=24, num_experts=2, num_experts_per_tok=1),
    "qwen3": _decoder("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    "phi": _decoder("PhiConfig", "PhiForCausalLM", num_key_value_heads=None),
    "phi3": _decoder("Phi3Config", "Phi3ForCausalLM"),
    "gemma": _decoder("GemmaConfig", "GemmaForCausalLM", head_dim=8),
    "gemma2": _decoder("Gemma2Config", "Gemma2ForCausalLM", head_dim=8),
    "olmo": _decoder("OlmoConfig", "OlmoForCausalLM"),
    "stablelm": _decoder("StableLmConfig", "StableLmForCausalLM"),
    "starcoder2": _decoder("Starcoder2Config", "Starcoder2ForCausalLM"),
    "smollm3": _decoder("SmolLM3Config", "SmolLM3ForCausalLM"),
    "granite": _decoder("GraniteConfig", "GraniteForCausalLM"),
    "cohere": _decoder("CohereConfig", "CohereForCausalLM"),
    "t5": _build("T5ForConditionalGeneration", "T5Config", d_kv=8, d_ff=37, num_layers=2, num_heads=4, **_SEQ2SEQ),
    "t5-gated": _build("T5ForConditionalGeneration", "T5Config", d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", **_SEQ2SEQ),
    "bart": _build("BartForConditionalGeneration", "BartConfig", **_BART, **_SEQ2SEQ),
}
ARCHITECTURES: dict[str, ModelCase] = {
    name: ModelCase(name, factory, (lambda: _text_inputs(seq2seq=True)) if name in ("t5", "t5-gated", "bart") else _text_inputs)
    for name, factory in ARCHITECTURE_FACTORIES.items()
}

#: small sizes for any config field of these names, so every method stays tiny
SMALL = {"r": 4, "bottleneck": 8, "num_virtual_tokens": 3, "group_size": 4, "num_blocks": 4, "k": 4}
#: VB-LoRA: bank vectors of length 1 fit every width of every tiny model (the heads are 3 and 50 wide);
#: two vectors (= topk) make each piece a smooth softmax mix, so a one-step check sees no top-k switch;
#: a bank far larger than peft's 0.02 start, whose update (quadratic in it) would move these tiny models'
#: ~0.01 logits by less than float32 resolves in one optimizer step
SMALL.update(vector_length=1, num_vectors=2, init_vector_bank_bound=0.5)
#: zero-init gated prompts (llamaadapter): one Adam step of 1e-3 on a single gate per layer moves some tiny
#: encoders' loss by less than float32 resolves at ~0.9 (about 5e-9 on RoBERTa); a gate per head and one
#: prompt token (the paper's formula either way) make the first step visible
SMALL.update(adapter_len=1, gate_per_head=True)


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
