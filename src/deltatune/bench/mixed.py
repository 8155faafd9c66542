"""Mixed-batch worker: one batch whose rows use different LoRA deltas (r=8 on every Linear of
the body), timed as a forward pass without grad.

Per case, interleaved in one process: ``base`` (the plain model, no deltas, same rows),
``deltatune`` (``delta_ids``), ``split`` (deltatune, each delta's rows run as their own
batch with ``using``) and ``peft`` (``adapter_names``). Row ``i`` uses delta ``i % deltas``.
"""

from __future__ import annotations

import copy

import torch

import deltatune as dt
from .interleave import interleaved
from .workers import ALPHA, MODELS, R, attach, build_model, make_batch, peak_rss_mib


#: (rows, deltas) of issue #4
CASES = [(32, 1), (32, 4), (32, 16), (64, 64)]
#: a case whose timed rounds pass ``budget_s`` stops after this many (peft's 64 x 64 takes seconds per batch)
MIN_REPEATS = 5


def _attach_many(lib: str, base, count: int, spec):
    """``base`` with ``count`` LoRA deltas ``d0..`` whose B are random (as after training)."""
    generator = torch.Generator().manual_seed(1)
    model = attach(lib, "lora", copy.deepcopy(base), spec, inference=True)  # adds "bench" / "default"
    if lib == "deltatune":
        config = dt.get_config(model, "bench")
        dt.delete(model, "bench")
        for i in range(count):
            dt.attach(model, config, name=f"d{i}")
    else:
        config = model.peft_config["default"]
        for i in range(count):
            model.add_adapter(f"d{i}", copy.deepcopy(config))
        model.delete_adapter("default")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.01 * torch.randn(p.shape, generator=generator))
    return model.eval()


def mixed(args: dict) -> dict:
    """Each case timed with its references interleaved in one process: the base alone on
    the same rows, deltatune's mixed batch, deltatune splitting the rows per delta, peft."""
    name, seed = args.get("model", "minilm"), args.get("seed", 0)
    repeats, warmup, spec = args.get("repeats", 15), args.get("warmup", 2), MODELS[name]
    budget = args.get("budget_s", 90.0)
    cases = [tuple(c) for c in args.get("cases", CASES)]
    base = build_model(name, seed).eval()
    most = max(d for _, d in cases)
    models = {"base": base, "deltatune": _attach_many("deltatune", base, most, spec),
              "peft": _attach_many("peft", base, most, spec)}
    out: dict = {"kind": "mixed", "cases": {}}
    for rows, deltas in cases:
        batch = make_batch(base, rows, args.get("seq", spec.seq), seed)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        names = [f"d{i % deltas}" for i in range(rows)]
        runs = {lib: _runner(lib, models["deltatune" if lib == "split" else lib], inputs, names)
                for lib in ("base", "deltatune", "split", "peft")}
        with torch.no_grad():
            timings = interleaved(runs, repeats, warmup, budget, MIN_REPEATS)
        out["cases"][f"{rows}x{deltas}"] = {
            "ms": timings.as_dict(),
            "ratios": {"deltatune_over_base": timings.ratio("deltatune", "base"),
                       "peft_over_base": timings.ratio("peft", "base"),
                       "deltatune_over_peft": timings.ratio("deltatune", "peft"),
                       "deltatune_over_split": timings.ratio("deltatune", "split")}}
    out["peak_rss_mib"] = peak_rss_mib()
    out["lora"] = {"r": R, "alpha": ALPHA}
    return out


def _runner(lib: str, model, inputs: dict, names: list[str]):
    if lib == "base":
        return lambda: model(**inputs)
    if lib == "peft":
        return lambda: model(**inputs, adapter_names=names)

    if lib == "deltatune":
        return lambda: model(**inputs, delta_ids=names)
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}

    def split():
        for delta, rows in groups.items():
            with dt.using(model, delta):
                model(**{k: v[rows] for k, v in inputs.items()})

    return split
