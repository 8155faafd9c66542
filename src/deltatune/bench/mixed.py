"""Mixed-batch worker: one batch whose rows use different LoRA deltas (r=8 on every Linear of
the body), timed as a forward pass without grad.

Per case, interleaved in one process: ``base`` (the plain model, no deltas, same rows),
``deltatune`` (``delta_ids``), ``split`` (deltatune, each delta's rows run as their own
batch with ``using``) and ``peft`` (``adapter_names``). Row ``i`` uses delta ``i % deltas``.
"""

from __future__ import annotations

import torch

import deltatune as dt
from .interleave import interleaved
from .cases import ALPHA, MODELS, R, build_model, make_batch, trained_copies
from .workers import peak_rss_mib


#: (rows, deltas) of issue #4
CASES = [(32, 1), (32, 4), (32, 16), (64, 64)]
#: a case whose timed rounds pass ``budget_s`` stops after this many (peft's 64 x 64 takes seconds per batch)
MIN_REPEATS = 5


def mixed(args: dict) -> dict:
    """Each case timed with its references interleaved in one process: the base alone on
    the same rows, deltatune's mixed batch, deltatune splitting the rows per delta, peft."""
    name, seed = args.get("model", "minilm"), args.get("seed", 0)
    repeats, warmup, spec = args.get("repeats", 15), args.get("warmup", 2), MODELS[name]
    budget = args.get("budget_s", 90.0)
    cases = [tuple(c) for c in args.get("cases", CASES)]
    base = build_model(name, seed).eval()
    most = max(d for _, d in cases)
    models = {"base": base, **dict(zip(("deltatune", "peft"), trained_copies(base, most, spec)))}
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
