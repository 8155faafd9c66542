"""The base's precision: float32, bfloat16 (the base held in bf16, or fp32 under autocast),
int8 and 4-bit (NF4) quantised bases, each with the same float32 LoRA (r=8 on q, k, v, o).

Kinds:

- ``precision_run`` (a fresh process per variant and library): train ``steps`` steps on real
  data (SmolLM2 + chatterbot, batch 8 x 128), then the test loss; the process's peak RSS;
- ``precision_ratios`` (one process, interleaved): the train step and greedy decoding of every
  variant, against float32.

peft runs beside deltatune where it can hold a LoRA on that base on CPU: peft's torchao layer
takes the int8 weights (it finds the quantised weight and wraps it); for NF4, peft has no
torchao path (its 4-bit layers are bitsandbytes'), so its plain LoRA layer runs on the NF4
tensor and the row says so.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from deltatune.data.datasets import load_dataset
from deltatune.models.load import load_model
from deltatune.train.batches import encode
from deltatune.train.loop import Settings, train
from deltatune.train.metrics import evaluate
from .cases import CASES, LR, MODELS, peft_twin, with_delta
from .interleave import interleaved
from .workers import make_train_step, peak_rss_mib

#: variant -> (the base's dtype, its quantisation, whether the step runs under bf16 autocast)
VARIANTS = {"fp32": ("fp32", None, False), "bf16": ("bf16", None, False), "autocast": ("fp32", None, True),
            "int8": ("fp32", "int8", False), "4bit": ("fp32", "4bit", False)}
DATA, MAX_LENGTH, BATCH = "chatterbot", 128, 8


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def base_model(name: str, variant: str):
    dtype, quantize, _ = VARIANTS[variant]
    torch.manual_seed(0)
    return load_model(name, MODELS[name].task, dtype=dtype, quantize=quantize)


def lora_model(base, lib: str, name: str):
    """``base`` with the bench's LoRA (deltatune's, or its peft twin from the same weights)."""
    if lib == "deltatune":
        return with_delta(base, CASES["lora"], MODELS[name])
    ours = with_delta(copy.deepcopy(base), CASES["lora"], MODELS[name])
    return peft_twin(ours, base, trainable=True)


def _data(tokenizer, seed: int = 0):
    splits = load_dataset(DATA, seed)
    return {part: encode(getattr(splits, part), tokenizer, splits.task, MAX_LENGTH) for part in ("train", "test")}


def precision_run(args: dict) -> dict:
    """One variant and library in a fresh process: trains, evaluates, reports peak RSS."""
    name, variant, lib, steps = args.get("model", "smollm2"), args["variant"], args.get("lib", "deltatune"), args["steps"]
    loaded = base_model(name, variant)
    encoded = _data(loaded.tokenizer)
    model = lora_model(loaded.model, lib, name)
    with autocast(VARIANTS[variant][2]):
        result = train(model, encoded["train"], Settings(steps=steps, batch_size=BATCH, lr=LR, progress=False))
        test = evaluate(model, encoded["test"])
    return {"kind": "precision_run", "variant": variant, "lib": lib, "steps": steps, "test_loss": test["loss"],
            "ms_per_step": 1000 * result["seconds"] / steps, "peak_rss_mib": peak_rss_mib()}


def precision_ratios(args: dict) -> dict:
    """Train steps and greedy decoding of every variant, interleaved in this process."""
    name, repeats, warmup = args.get("model", "smollm2"), args.get("repeats", 15), args.get("warmup", 2)
    variants = args.get("variants", list(VARIANTS))
    models, tokenizer = {}, None
    for variant in variants:
        if variant == "autocast":
            continue  # the float32 model, run under autocast
        loaded = base_model(name, variant)
        tokenizer = loaded.tokenizer
        models[variant] = lora_model(loaded.model, "deltatune", name)
    batch = encode_batch(tokenizer, _data(tokenizer)["train"])
    steps = {}
    for variant in variants:
        model = models["fp32" if variant == "autocast" else variant].train()
        step, _ = make_train_step(model, batch)
        steps[variant] = _under(step, VARIANTS[variant][2])
    train_times = interleaved(steps, repeats, warmup, args.get("budget_s", 1800.0))
    new_tokens = args.get("new_tokens", 16)
    prompt = batch["input_ids"][:1, :16]
    options = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "max_new_tokens": new_tokens,
               "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    decodes = {v: _under(lambda m=models["fp32" if v == "autocast" else v]: m.eval().generate(**options),
                         VARIANTS[v][2]) for v in variants}
    with torch.no_grad():
        decode_times = interleaved(decodes, repeats, warmup, args.get("budget_s", 1800.0))
    return {"kind": "precision_ratios", "train_ms": train_times.as_dict(), "decode_ms": decode_times.as_dict(),
            "train_over_fp32": {v: train_times.ratio(v, "fp32") for v in variants if v != "fp32"},
            "decode_tokens_per_s": {v: new_tokens / (t["median"] / 1000) for v, t in decode_times.as_dict().items()},
            "new_tokens": new_tokens, "peak_rss_mib": peak_rss_mib()}


def encode_batch(tokenizer, encoded) -> dict:
    """The first ``BATCH`` training examples as one batch (labels: the answer tokens)."""
    return encoded.collate(list(range(BATCH)))


def _under(run, on: bool):
    def wrapped():
        with autocast(on):
            return run()
    return wrapped
