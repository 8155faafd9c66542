"""What the bench runs: its models, their batches, and the deltas it times, as deltatune configs.

A benchmarked delta is a deltatune config (``CASES``), built on the model by deltatune. Its
peft counterpart is not configured separately: :func:`peft_twin` exports the very same delta
through the method's peft codec (:func:`deltatune.interop.peft.save_peft`) and loads it with
``peft.PeftModel.from_pretrained``, so both libraries start from the same weights on the same
modules, and a method peft cannot represent has no peft row (its ``peft_refusal`` says why).
Targets come from the model's structure (roles, :mod:`deltatune.core.roles`), so no module
names are written here.

Every model is built from a fixed seed, so two workers with the same arguments start from the
same weights and see the same batches. ``"tiny"`` and ``"tiny-llama"`` are small random BERT
and Llama models (used by the tests).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import tempfile
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

import deltatune as dt
from deltatune.core.registry import get_method, method_specs
from deltatune.core.roles import default_targets
from deltatune.errors import ConfigError, NotApplicableError, TargetError
from deltatune.interop.peft import save_peft
from deltatune.models.load import load_model

R, ALPHA, TOKENS, LR = 8, 16, 20, 1e-3
#: the attention projections (the train-step LoRA of issue 11: q, k, v and o)
ATTENTION = ("q|qkv", "k", "v", "o")
#: sizes every benchmarked delta gets, where its config has the field
SIZES = {"r": R, "alpha": ALPHA, "dropout": 0.0, "num_virtual_tokens": TOKENS}
#: the train-step deltas of issue 11, by label; ``roles`` are turned into the model's module
#: patterns. Any other registered method is benchmarked with its own defaults (``case``).
CASES: dict[str, dict] = {
    "lora": {"method": "lora", "r": R, "alpha": ALPHA, "dropout": 0.0, "roles": ATTENTION},
    "dora": {"method": "dora", "r": R, "alpha": ALPHA, "dropout": 0.0, "roles": ATTENTION},
    "ia3": {"method": "ia3"},
    "prompt": {"method": "prompt", "num_virtual_tokens": TOKENS},
    "prefix": {"method": "prefix", "num_virtual_tokens": TOKENS},
}
#: the inference delta: LoRA on every Linear of the body (never the head)
ALL_LINEAR = {"method": "lora", "r": R, "alpha": ALPHA, "targets": "all-linear"}
#: the train-step references that are not deltas: the frozen floor (forward and backward to the
#: input embeddings, no optimizer) and full fine-tuning
BASELINES = ("floor", "full")
NAME = "bench"  # the benchmarked delta's name in deltatune and its adapter name in peft


def case(label: str) -> dict:
    """The benchmarked delta called ``label``: one of ``CASES``, else the registered method of
    that name at its default targets, with ``SIZES`` where its config has those fields."""
    if label in CASES:
        return CASES[label]
    fields = {f.name for f in dataclasses.fields(get_method(label).config_class)}
    return {"method": label, **{k: v for k, v in SIZES.items() if k in fields}}


def benchmarkable() -> list[str]:
    """Every registered method the bench can time: trained from flags, a delta (not full
    fine-tuning, not a fusion of other deltas), not the head-only reference."""
    return [s.name for s in method_specs() if s.trainable_from_flags and not s.trains_base and not s.fuses
            and not s.reference]


def default_methods() -> list[str]:
    """What ``make bench`` times by default: issue 11's cases and every method peft also has."""
    return [*CASES, *(m for m in benchmarkable() if m not in CASES and get_method(m).peft is not None)]


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: its task and its batch."""

    task: str  # "classification" (2 labels, the head trains) or "causal_lm" (labels = inputs)
    batch: int
    seq: int
    packaged: bool = True  # a packaged model the server can load by name (not a random test model)


MODELS = {
    "minilm": BenchModel("classification", 32, 64),
    "smollm2": BenchModel("causal_lm", 8, 128),
    "tiny": BenchModel("classification", 4, 16, packaged=False),
    "tiny-llama": BenchModel("causal_lm", 2, 16, packaged=False),
}


def build_model(name: str, seed: int = 0):
    """The base model (a sequence classifier with a seeded 2-label head, or a causal LM)."""
    torch.manual_seed(seed)
    import transformers

    if name == "tiny":
        config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=128, num_labels=2)
        return transformers.BertForSequenceClassification(config)
    if name == "tiny-llama":
        config = transformers.LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128)
        return transformers.LlamaForCausalLM(config)
    return load_model(name, MODELS[name].task, 2).model


def make_batch(model, batch: int, seq: int, seed: int = 0, task: str = "classification") -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator) if task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}


def batch_for(args: dict, model, seed_offset: int = 0) -> dict:
    spec = MODELS[args.get("model", "minilm")]
    return make_batch(model, args.get("batch", spec.batch), args.get("seq", spec.seq), args.get("seed", 0) + seed_offset,
                      spec.task)


def delta_config(case: dict, model, spec: BenchModel, inference: bool = False) -> dt.DeltaConfig:
    """``case`` as a deltatune config for ``model``: its roles resolved to module patterns and,
    for a classifier in training, the head trained too (peft's SEQ_CLS does the same)."""
    fields = {k: v for k, v in case.items() if k != "roles"}
    if "roles" in case:
        fields["targets"] = list(default_targets(model, list(case["roles"]), case["method"]))
    if spec.task == "classification" and not inference:
        fields["modules_to_save"] = ["classifier"]
    return dt.config_from_dict(fields)


def with_delta(model, case: dict, spec: BenchModel, inference: bool = False, name: str = NAME):
    """``model`` with ``case`` attached (and active) as delta ``name``."""
    dt.attach(model, delta_config(case, model, spec, inference), name=name)
    return model


def baseline(kind: str, model):
    """``model`` for a reference row: everything frozen (``floor``) or everything trained (``full``)."""
    for p in model.parameters():
        p.requires_grad_(kind == "full")
    return model


def peft_refusal(case: dict) -> str | None:
    """Why ``case``'s method has no peft counterpart, or ``None`` when it has one."""
    spec = get_method(case["method"])
    return None if spec.peft is not None else spec.peft_refusal


def refusal(error: Exception, lib: str) -> tuple[str, str]:
    """Why building a case on ``lib`` gave no row: ``("not_applicable", reason)`` when the method
    (at the bench's sizes) cannot adapt the model, ``("no_peft", reason)`` when peft's codec
    cannot hold the delta on it. Any other error is a real failure and is raised again."""
    if isinstance(error, (NotApplicableError, TargetError)):
        return "not_applicable", str(error)
    if isinstance(error, ConfigError) and lib == "peft":
        return "no_peft", str(error)
    raise error


def export_peft(ours, directory: str, names: list[str] | None = None) -> list[str]:
    """The deltas ``names`` (default: ``[NAME]``) of ``ours`` written as peft adapter folders
    under ``directory``, through their method's peft codec."""
    return [str(save_peft(ours, os.path.join(directory, n), n)) for n in names or [NAME]]


def load_peft(base, folders: list[str], *, trainable: bool):
    """``base`` as a peft model holding the adapters in ``folders`` (named as the folders), the
    first active. To train, each is built fresh with ``get_peft_model`` and given the file's
    tensors (peft loads a prompt-learning adapter for inference only)."""
    import peft
    from safetensors.torch import load_file

    names = [os.path.basename(f) for f in folders]
    if not trainable:
        model = peft.PeftModel.from_pretrained(base, folders[0], adapter_name=names[0])
        for name, folder in zip(names[1:], folders[1:]):
            model.load_adapter(folder, adapter_name=name)
        return model
    model = None
    for name, folder in zip(names, folders):
        config = peft.PeftConfig.from_pretrained(folder)
        config.inference_mode = False
        if model is None:
            model = peft.get_peft_model(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        tensors = load_file(os.path.join(folder, "adapter_model.safetensors"))
        peft.set_peft_model_state_dict(model, tensors, adapter_name=name)
        held = peft.get_peft_model_state_dict(model, adapter_name=name)
        if held.keys() != tensors.keys() or any(not torch.equal(held[k], v) for k, v in tensors.items()):
            raise RuntimeError(f"peft's {name!r} does not hold the tensors of {folder}")
    model.set_adapter(names[0])
    return model


def peft_twin(ours, base, *, trainable: bool, names: list[str] | None = None):
    """A peft model on ``base`` holding exactly the deltas ``names`` of ``ours``."""
    with tempfile.TemporaryDirectory() as tmp:
        return load_peft(base, export_peft(ours, tmp, names), trainable=trainable)


def perturbed(model, names: list[str], seed: int):
    """``model`` with every parameter of the deltas ``names`` moved by 0.01 N(0, 1), so that a
    LoRA's zero-initialised factor is non-zero, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for _, p in dt.delta_parameters(model, name):
                p.add_(0.01 * torch.randn(p.shape, generator=generator))
    return model


def trained_copies(base, count: int, spec: BenchModel, seed: int = 1) -> tuple:
    """``(deltatune model, peft model)``: each a copy of ``base`` with ``count`` all-Linear LoRA
    deltas ``d0..`` holding the same non-zero weights, ``d0`` active, in eval mode."""
    ours = copy.deepcopy(base)
    names = [f"d{i}" for i in range(count)]
    for name in names:
        with_delta(ours, ALL_LINEAR, spec, inference=True, name=name)
    perturbed(ours, names, seed)
    dt.set_active(ours, names[0])
    theirs = peft_twin(ours, copy.deepcopy(base), trainable=False, names=names)
    theirs.set_adapter(names[0])
    return ours.eval(), theirs.eval()
