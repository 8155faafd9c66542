"""The measurements of ``make bench``, each run in a fresh process by ``bench/measure.py``.

Kinds here: ``train_step`` (one library and method in a fresh process: its peak RSS, and a
train step time that is not used for ratios) and ``equivalence`` (LoRA losses of deltatune
vs peft from identical weights). The interleaved ratio kinds are in ratios.py, mixed.py and
decode.py; ``swap`` (switching deltas on a live model) in swap.py, ``serve`` in serve.py.

What is run (models, batches, the deltas as deltatune configs, their peft twins) is in
cases.py.
"""

from __future__ import annotations

import copy
import gc
import resource
import tempfile
import time
import warnings

import torch

import deltatune as dt
from deltatune.errors import ConfigError, NotApplicableError, TargetError
from .cases import (BASELINES, CASES, LR, MODELS, NAME, BenchModel, baseline, batch_for, build_model, case, export_peft,
                    load_peft, peft_twin, refusal, with_delta)
from .interleave import spread


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()


def train_model(lib: str, label: str, base, spec: BenchModel):
    """A copy of ``base`` for the train-step row ``label`` (a case of ``CASES`` or a baseline) in
    ``lib``: deltatune's delta, or its peft twin from the same initial weights."""
    if label in BASELINES:
        return baseline(label, copy.deepcopy(base))
    ours = with_delta(copy.deepcopy(base), case(label), spec)
    return ours if lib == "deltatune" else peft_twin(ours, copy.deepcopy(base), trainable=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def summary(times: list[float]) -> dict:
    """Median, quartiles, minimum and count of ``times`` (seconds), in milliseconds."""
    return spread([t * 1000 for t in times])


def make_train_step(model, batch: dict, floor: bool = False):
    """``(step, trainable count)``: one training step of ``model`` (forward, backward, AdamW);
    the ``floor`` does forward and backward to the input embeddings, with no optimizer."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    if floor:
        with torch.no_grad():
            embeds0 = model.get_input_embeddings()(batch["input_ids"])
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> None:
        if floor:
            embeds = embeds0.detach().requires_grad_(True)
            model(inputs_embeds=embeds, **inputs).loss.backward()
            return
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, sum(p.numel() for p in params)


def fresh_model(lib: str, label: str, name: str, seed: int, build=build_model):
    """The train-step model of one row, built in this process without keeping anything else:
    the peft twin is exported from a deltatune model that is dropped before peft loads it (on
    a second ``build(name, seed)``), so the process's peak memory is peft's own."""
    spec = MODELS[name]
    if label in BASELINES:
        return baseline(label, build(name, seed))
    ours = with_delta(build(name, seed), case(label), spec)
    if lib == "deltatune":
        return ours
    with tempfile.TemporaryDirectory() as tmp:
        folders = export_peft(ours, tmp)
        del ours
        gc.collect()
        return load_peft(build(name, seed), folders, trainable=True)


def train_step(args: dict) -> dict:
    """One library and method in its own process: its peak RSS, and a median train step
    (``floor``: all frozen, backward to the input embeddings; ``full``: everything trains)."""
    lib, label, name = args.get("lib", "deltatune"), args["method"], args.get("model", "minilm")
    try:
        model = fresh_model(lib, label, name, args.get("seed", 0)).train()
    except (ConfigError, NotApplicableError, TargetError) as error:
        # the method cannot adapt this model, or its peft codec cannot hold it: the reason, no row
        return {"kind": "train_step", "lib": lib, "method": label, "refused": refusal(error, lib)[1]}
    step, trainable = make_train_step(model, batch_for(args, model), floor=label == "floor")
    for _ in range(args.get("warmup", 3)):
        step()
    times = []
    for _ in range(args.get("repeats", 20)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"kind": "train_step", "lib": lib, "method": label, "step_ms": summary(times),
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
    """LoRA from the same initial weights in both libraries (peft's exported from deltatune's):
    the first ``steps`` training losses."""
    name, steps, seed = args.get("model", "minilm"), args.get("steps", 50), args.get("seed", 0)
    base = build_model(name, seed)
    mine = with_delta(copy.deepcopy(base), CASES["lora"], MODELS[name])
    theirs = peft_twin(mine, base, trainable=True)
    batches = [batch_for(args, mine, i) for i in range(5)]
    trainable = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (mine, theirs)]
    if trainable[0] != trainable[1]:
        raise RuntimeError(f"deltatune trains {trainable[0]} parameters, its peft twin {trainable[1]}")
    ours = _train_losses(mine, steps, batches)
    peft_losses = _train_losses(theirs, steps, batches)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, peft_losses)]
    return {"kind": "equivalence", "steps": steps, "trainable": trainable[0],
            "delta_tensors": len(list(dt.delta_parameters(mine, NAME))), "max_rel_diff": max(rel),
            "deltatune_losses": ours, "peft_losses": peft_losses}
