"""Greedy decoding with unmerged LoRA deltas (r=8 on every Linear of the body), interleaved
with the base and peft in one process.

- ``b1``: one prompt, one delta, against the base and peft's unmerged LoRA;
- ``8x4``: eight prompts over four deltas in one batch (``generate(..., delta_ids=...)``),
  against the base on the same prompts and peft's ``adapter_names``.

Every run decodes exactly ``new_tokens`` tokens (``min_new_tokens`` too), so runs compare
equal work; times are per run, tokens per second are derived from them.
"""

from __future__ import annotations

import torch

from .interleave import interleaved
from .cases import MODELS, build_model, trained_copies
from .workers import peak_rss_mib

#: (prompts, deltas) of issue #11
CASES = [(1, 1), (8, 4)]


def decode(args: dict) -> dict:
    name, seed = args.get("model", "smollm2"), args.get("seed", 0)
    spec, repeats, warmup = MODELS[name], args.get("repeats", 15), args.get("warmup", 2)
    new_tokens, prompt_len = args.get("new_tokens", 16), args.get("prompt_tokens", 16)
    base = build_model(name, seed).eval()
    most = max(d for _, d in CASES)
    models = {"base": base, **dict(zip(("deltatune", "peft"), trained_copies(base, most, spec)))}
    out: dict = {"kind": "decode", "new_tokens": new_tokens, "prompt_tokens": prompt_len, "cases": {}}
    generator = torch.Generator().manual_seed(seed)
    for prompts, deltas in CASES:
        ids = torch.randint(0, base.config.vocab_size, (prompts, prompt_len), generator=generator)
        names = [f"d{i % deltas}" for i in range(prompts)]
        options = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "max_new_tokens": new_tokens,
                   "min_new_tokens": new_tokens, "do_sample": False, "pad_token_id": 0}
        # one delta: each library's ordinary active adapter; several: their per-row routing
        routed = ({"delta_ids": names}, {"adapter_names": names}) if deltas > 1 else ({}, {})
        runs = {"base": lambda: models["base"].generate(**options),
                "deltatune": lambda: models["deltatune"].generate(**options, **routed[0]),
                "peft": lambda: models["peft"].generate(**options, **routed[1])}
        with torch.no_grad():
            timings = interleaved(runs, repeats, warmup, args.get("budget_s", 900.0))
        out["cases"][f"{prompts}x{deltas}"] = {
            "ms": timings.as_dict(),
            "tokens_per_s": {k: prompts * new_tokens / (v["median"] / 1000) for k, v in timings.as_dict().items()},
            "ratios": {"deltatune_over_base": timings.ratio("deltatune", "base"),
                       "peft_over_base": timings.ratio("peft", "base"),
                       "deltatune_over_peft": timings.ratio("deltatune", "peft")}}
    out["peak_rss_mib"] = peak_rss_mib()
    return out
