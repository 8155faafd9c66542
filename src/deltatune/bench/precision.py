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
import dataclasses

import torch

from deltatune.data.datasets import load_dataset
from deltatune.core.recompute import enable_gradient_checkpointing
from deltatune.models.load import load_model, model_folder
from deltatune.train.batches import encode
from deltatune.train.loop import Settings, train
from deltatune.train.metrics import evaluate
from .cases import LR, MODELS
from .interleave import interleaved
from .workers import fresh_model, make_train_step, peak_rss_mib

#: variant -> (the base's dtype, its quantisation, whether the step runs under bf16 autocast,
#: whether the blocks' activations are recomputed in the backward pass: gradient checkpointing)
VARIANTS = {"fp32": ("fp32", None, False, False), "bf16": ("bf16", None, False, False),
            "autocast": ("fp32", None, True, False), "int8": ("fp32", "int8", False, False),
            "4bit": ("fp32", "4bit", False, False), "fp32-gc": ("fp32", None, False, True),
            "int8-gc": ("fp32", "int8", False, True), "4bit-gc": ("fp32", "4bit", False, True)}
#: the quantised bases peft's LoRA also runs on here (its torchao layer for int8; its plain
#: LoRA layer over the NF4 tensor), and the float32 reference
PEFT_VARIANTS = ("fp32", "int8", "4bit")
DATA, MAX_LENGTH, BATCH = "chatterbot", 128, 8
#: test rows each fresh run evaluates (the same first rows for every variant: the losses compare
#: like for like; the whole 221-row split costs more than the training steps on 2 cores)
TEST_ROWS = 64


def autocast(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def base_model(name: str, variant: str, seed: int = 0):
    """The packaged model ``name`` at ``variant``'s precision (autocast: the float32 model)."""
    dtype, quantize, _, _ = VARIANTS[variant]
    torch.manual_seed(seed)
    return load_model(name, MODELS[name].task, dtype=dtype, quantize=quantize).model


def lora_model(lib: str, name: str, variant: str):
    """The bench's LoRA on ``variant``'s base: deltatune's, or its peft twin from the same
    initial weights (on a second copy of the base, loaded after deltatune's is dropped); with
    the variant's gradient checkpointing on."""
    model = fresh_model(lib, "lora", name, 0, build=lambda n, seed: base_model(n, variant, seed))
    if VARIANTS[variant][3]:
        enable_gradient_checkpointing(model)
    return model


def _data(name: str, seed: int = 0):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_folder(name))
    splits = load_dataset(DATA, seed)
    encoded = {part: encode(getattr(splits, part), tokenizer, splits.task, MAX_LENGTH) for part in ("train", "test")}
    test = encoded["test"]
    encoded["test"] = dataclasses.replace(test, input_ids=test.input_ids[:TEST_ROWS], labels=test.labels[:TEST_ROWS])
    return encoded


def precision_run(args: dict) -> dict:
    """One variant and library in a fresh process: trains, evaluates, reports peak RSS."""
    name, variant, lib, steps = args.get("model", "smollm2"), args["variant"], args.get("lib", "deltatune"), args["steps"]
    model = lora_model(lib, name, variant)
    encoded = _data(name)
    with autocast(VARIANTS[variant][2]):
        result = train(model, encoded["train"], Settings(steps=steps, batch_size=BATCH, lr=LR, progress=False))
        test = evaluate(model, encoded["test"])
    return {"kind": "precision_run", "variant": variant, "lib": lib, "steps": steps, "test_loss": test["loss"],
            "test_rows": len(encoded["test"]),
            "ms_per_step": 1000 * result["seconds"] / steps, "peak_rss_mib": peak_rss_mib()}


def precision_ratios(args: dict) -> dict:
    """Train steps and greedy decoding of every variant (and peft's LoRA on the quantised
    bases), interleaved in this process; ratios against deltatune on float32."""
    name, repeats, warmup = args.get("model", "smollm2"), args.get("repeats", 15), args.get("warmup", 2)
    variants = ["fp32", *(v for v in args.get("variants", list(VARIANTS)) if v != "fp32")]  # fp32: the reference
    models = {v: lora_model("deltatune", name, v) for v in variants if v != "autocast"}
    models.update({f"peft:{v}": lora_model("peft", name, v) for v in args.get("peft", PEFT_VARIANTS)})
    runs = [*variants, *(f"peft:{v}" for v in args.get("peft", PEFT_VARIANTS))]
    batch = _data(name)["train"].collate(list(range(BATCH)))

    def model_of(run: str):
        return models["fp32" if run == "autocast" else run]

    parts = args.get("parts", ("train", "decode"))
    train_ms, train_over_fp32, decode_ms, tokens_per_s = {}, {}, {}, {}
    if "train" in parts:
        steps = {run: _under(make_train_step(model_of(run).train(), batch)[0], run == "autocast") for run in runs}
        train_times = interleaved(steps, repeats, warmup, args.get("budget_s", 1800.0))
        train_ms = train_times.as_dict()
        train_over_fp32 = {run: train_times.ratio(run, "fp32") for run in runs if run != "fp32"}
    new_tokens = args.get("new_tokens", 16)
    prompt = batch["input_ids"][:1, :16]
    options = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt), "max_new_tokens": new_tokens,
               "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
    if "decode" in parts:
        decodes = {run: _under(lambda m=model_of(run): m.eval().generate(**options), run == "autocast") for run in runs}
        with torch.no_grad():
            decode_ms = interleaved(decodes, repeats, warmup, args.get("budget_s", 1800.0)).as_dict()
        tokens_per_s = {run: new_tokens / (t["median"] / 1000) for run, t in decode_ms.items()}
    return {"kind": "precision_ratios", "parts": list(parts), "train_ms": train_ms, "decode_ms": decode_ms,
            "train_over_fp32": train_over_fp32, "decode_tokens_per_s": tokens_per_s,
            "new_tokens": new_tokens, "peak_rss_mib": peak_rss_mib()}


def _under(run, on: bool):
    def wrapped():
        with autocast(on):
            return run()
    return wrapped
