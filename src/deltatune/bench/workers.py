"""The measurements of ``make bench``, each run in a fresh process by ``bench/measure.py``.

Kinds here: ``train_step`` (one library and method in a fresh process: its peak RSS, and a
train step time that is not used for ratios) and ``equivalence`` (LoRA losses of deltatune
vs peft from identical weights). The interleaved ratio kinds are in ratios.py, mixed.py and
decode.py; ``swap`` (switching deltas on a live model) in swap.py, ``serve`` in serve.py.

Every worker builds its model from a fixed seed, so two workers with the same arguments
start from the same weights and see the same batches. ``"model": "tiny"`` swaps the packaged
MiniLM for a small random BERT (used by the tests).
"""

from __future__ import annotations

import os
import re
import resource
import time
import warnings
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from deltatune.models.load import load_model

import deltatune as dt
from .interleave import spread

R, ALPHA, TOKENS, LR = 8, 16, 20, 1e-3


@dataclass(frozen=True)
class BenchModel:
    """One benchmarked model: how to build it, its batch, and which modules each method adapts."""

    task: str  # "classification" (2 labels, the head trains) or "causal_lm" (labels = inputs)
    batch: int
    seq: int
    lora: tuple[str, ...]  # module-name suffixes for LoRA / DoRA in train steps (the attention projections)
    ia3: str  # regex of IA3's modules (keys, values, feed-forward output)
    ia3_feedforward: str  # the subset whose input IA3 scales
    inference_exclude: tuple[str, ...]  # Linear modules the all-Linear inference LoRA leaves alone
    packaged: bool = True  # a packaged model the server can load by name (not a random test model)


_BERT_LIKE = {"lora": ("query", "key", "value", "attention.output.dense"),
              "ia3": r"(^|\.)layer\.\d+\.(attention\.self\.(key|value)|output\.dense)$",
              "ia3_feedforward": r"(^|\.)layer\.\d+\.output\.dense$", "inference_exclude": ("classifier", "pooler.dense")}
_LLAMA_LIKE = {"lora": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "ia3": r"(^|\.)layers\.\d+\.(self_attn\.(k|v)_proj|mlp\.down_proj)$",
               "ia3_feedforward": r"(^|\.)layers\.\d+\.mlp\.down_proj$", "inference_exclude": ("lm_head",)}
MODELS = {
    "minilm": BenchModel("classification", 32, 64, **_BERT_LIKE),
    "smollm2": BenchModel("causal_lm", 8, 128, **_LLAMA_LIKE),
    "tiny": BenchModel("classification", 4, 16, **_BERT_LIKE, packaged=False),  # random BERT, for tests
    "tiny-llama": BenchModel("causal_lm", 2, 16, **_LLAMA_LIKE, packaged=False),  # random Llama, for tests
}
# kept for the tests and the equivalence worker's messages
LORA_TARGETS = list(MODELS["minilm"].lora)


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()


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
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = torch.randint(0, 2, (batch,), generator=generator) if task == "classification" else ids.clone()
    return {"input_ids": ids, "attention_mask": torch.ones(batch, seq, dtype=torch.long), "labels": labels}


def batch_for(args: dict, model, seed_offset: int = 0) -> dict:
    spec = MODELS[args.get("model", "minilm")]
    return make_batch(model, args.get("batch", spec.batch), args.get("seq", spec.seq), args.get("seed", 0) + seed_offset,
                      spec.task)


def module_names(model, pattern: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(pattern, n)]


def _all_linear(model, spec: BenchModel) -> list[str]:
    return [n for n in module_names(model, ".") if not any(n == e or n.endswith("." + e) for e in spec.inference_exclude)]


def attach(lib: str, method: str, model, spec: BenchModel, inference: bool = False):
    """The model with the method attached by ``lib``. For classifiers the head trains in both
    libraries (peft's SEQ_CLS task puts it in modules_to_save, deltatune is told the same)."""
    if method in ("floor", "full"):
        for p in model.parameters():
            p.requires_grad_(method == "full")
        return model
    head = ["classifier"] if spec.task == "classification" and not inference else []
    if lib == "deltatune":
        return _attach_deltatune(method, model, spec, head, inference)
    import peft

    task = {} if inference else {"task_type": "SEQ_CLS" if spec.task == "classification" else "CAUSAL_LM"}
    if method in ("lora", "dora"):
        targets = _all_linear(model, spec) if inference else list(spec.lora)
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                                 use_dora=method == "dora", **task)
    elif method == "ia3":
        config = peft.IA3Config(target_modules=module_names(model, spec.ia3),
                                feedforward_modules=module_names(model, spec.ia3_feedforward), **task)
    elif method == "prompt":
        config = peft.PromptTuningConfig(num_virtual_tokens=TOKENS, **task)
    elif method == "prefix":
        config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, prefix_projection=False, **task)
    else:
        raise ValueError(method)
    return peft.get_peft_model(model, config)


def _attach_deltatune(method: str, model, spec: BenchModel, head: list[str], inference: bool):
    if method in ("lora", "dora"):
        cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
        if inference:
            config = cls(r=R, alpha=ALPHA, targets=["re:" + re.escape(n) for n in _all_linear(model, spec)])
        else:
            config = cls(r=R, alpha=ALPHA, dropout=0.0, targets=list(spec.lora), modules_to_save=head)
    elif method == "ia3":
        config = dt.IA3Config(targets=["re:" + re.escape(n) for n in module_names(model, spec.ia3)],
                              feedforward=["re:" + re.escape(n) for n in module_names(model, spec.ia3_feedforward)],
                              modules_to_save=head)
    elif method == "prompt":
        config = dt.PromptConfig(num_virtual_tokens=TOKENS, modules_to_save=head)
    elif method == "prefix":
        config = dt.PrefixConfig(num_virtual_tokens=TOKENS, modules_to_save=head)
    else:
        raise ValueError(method)
    dt.attach(model, config, name="bench")
    return model


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def summary(times: list[float]) -> dict:
    """Median, quartiles, minimum and count of ``times`` (seconds), in milliseconds."""
    return spread([t * 1000 for t in times])


def make_train_step(model, method: str, batch: dict):
    """``(step, trainable count)``: one training step of ``model`` (forward, backward, AdamW);
    the ``floor`` does forward and backward to the input embeddings, with no optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    if method == "floor":
        with torch.no_grad():
            embeds0 = model.get_input_embeddings()(batch["input_ids"])
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> None:
        if method == "floor":
            embeds = embeds0.detach().requires_grad_(True)
            model(inputs_embeds=embeds, **inputs).loss.backward()
            return
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def train_step(args: dict) -> dict:
    """One library and method in its own process: its peak RSS, and a median train step
    (``floor``: all frozen, backward to the input embeddings; ``full``: everything trains)."""
    lib, method, name = args.get("lib", "deltatune"), args["method"], args.get("model", "minilm")
    model = attach(lib, method, build_model(name, args.get("seed", 0)), MODELS[name])
    model.train()
    step, trainable = make_train_step(model, method, batch_for(args, model))
    for _ in range(args.get("warmup", 3)):
        step()
    times = []
    for _ in range(args.get("repeats", 20)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"kind": "train_step", "lib": lib, "method": method, "step_ms": summary(times),
            "trainable": trainable, "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


def _train_losses(model, steps: int, batches: list[dict]) -> list[float]:
    model.eval()  # dropout 0 everywhere: the losses are deterministic
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def equivalence(args: dict) -> dict:
    """LoRA: deltatune's initial A/B copied into peft's parameters; the first ``steps`` losses."""
    name, steps, seed = args.get("model", "minilm"), args.get("steps", 50), args.get("seed", 0)
    mine = attach("deltatune", "lora", build_model(name, seed), MODELS[name])
    batches = [batch_for(args, mine, i) for i in range(5)]
    initial = {n: p.detach().clone() for n, p in dt.delta_parameters(mine, "bench")}
    theirs = attach("peft", "lora", build_model(name, seed), MODELS[name])
    copied = 0
    with torch.no_grad():
        for pname, param in theirs.named_parameters():
            match = re.match(r"^base_model\.model\.(.+)\.lora_(A|B)\.default\.weight$", pname)
            if match:
                param.copy_(initial[f"{match[1]}.lora_{match[2]}"])
                copied += 1
    lora_tensors = sum(1 for n in initial if ".lora_" in n)
    if copied != lora_tensors:
        raise RuntimeError(f"copied {copied} LoRA tensors into peft, deltatune has {lora_tensors}")
    ours = _train_losses(mine, steps, batches)
    peft_losses = _train_losses(theirs, steps, batches)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, peft_losses)]
    return {"kind": "equivalence", "steps": steps, "copied_tensors": copied, "max_rel_diff": max(rel),
            "deltatune_losses": ours, "peft_losses": peft_losses}
