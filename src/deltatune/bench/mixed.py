"""Mixed-batch worker: one batch whose rows use different LoRA deltas (r=8 on every Linear of
the body), timed as a forward pass without grad.

``lib``: ``base`` (the plain model, no deltas, same rows), ``deltatune`` (``delta_ids``),
``split`` (deltatune, each delta's rows run as their own batch with ``using``) or ``peft``
(``adapter_names``). Row ``i`` uses delta ``i % deltas``.
"""

from __future__ import annotations

import copy
import time

import torch

import deltatune as dt
from .workers import ALPHA, MODELS, R, attach, build_model, make_batch, peak_rss_mib, summary


#: (rows, deltas) of issue #4
CASES = [(32, 1), (32, 4), (32, 16), (64, 64)]
#: a case whose timed runs pass ``budget_s`` stops after this many (peft's 64 x 64 takes seconds per batch)
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
    lib, name, seed = args["lib"], args.get("model", "minilm"), args.get("seed", 0)
    repeats, warmup, spec = args.get("repeats", 20), args.get("warmup", 3), MODELS[name]
    budget = args.get("budget_s", 90.0)
    cases = [tuple(c) for c in args.get("cases", CASES)]
    base = build_model(name, seed).eval()
    most = max(d for _, d in cases)
    model = base if lib == "base" else _attach_many("peft" if lib == "peft" else "deltatune", base, most, spec)
    out: dict = {"kind": "mixed", "lib": lib, "cases": {}}
    for rows, deltas in cases:
        batch = make_batch(model, rows, args.get("seq", spec.seq), seed)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        names = [f"d{i % deltas}" for i in range(rows)]
        run = _runner(lib, model, inputs, names)
        times: list[float] = []
        with torch.no_grad():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                run()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
                if len(times) >= MIN_REPEATS and sum(times) > budget:
                    break  # a very slow configuration: fewer repeats, recorded as n
        out["cases"][f"{rows}x{deltas}"] = summary(times)
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
