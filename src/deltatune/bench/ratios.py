"""The ratio measurements of ``make bench``: every case and its references in one process,
interleaved (see interleave.py), so a ratio compares runs that shared the machine's state.

Kinds (each run by ``bench/measure.py`` in a fresh process per model):

- ``train_ratios``: the train step (forward + backward + AdamW) of each method in both
  libraries, the frozen floor (forward + backward to the input embeddings) and full
  fine-tuning, all on their own copy of the base;
- ``inference_ratios``: LoRA r=8 on every Linear of the body, unmerged and merged, in both
  libraries, at batch 1 and the model's batch; merge + unmerge, save and load;
- ``mixed_train``: several LoRA deltas trained in one step with ``delta_ids`` against the
  same deltas trained one after the other on their own rows.

Mixed-batch inference is in mixed.py, decoding in decode.py.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import deltatune as dt
from deltatune.errors import ConfigError, NotApplicableError, TargetError
from .interleave import interleaved
from .cases import (BASELINES, CASES, LR, MODELS, batch_for, build_model, case, make_batch, peft_refusal, refusal, trained_copies,
                    with_delta)
from .workers import make_train_step, peak_rss_mib, train_model

#: timed rounds stop once they have taken this long (and at least 5 are in)
BUDGET_S = 600.0
#: timed rounds of loading a delta (each needs its own copy of the base in memory)
LOAD_ROUNDS = 5


def train_ratios(args: dict) -> dict:
    """Every method's train step in both libraries, with the floor and full fine-tuning, interleaved."""
    name, methods = args.get("model", "minilm"), args.get("methods", ["lora"])
    spec = MODELS[name]
    base = build_model(name, args.get("seed", 0))
    cases, trainable = {}, {}
    keys = {label: label for label in BASELINES}
    for label in methods:
        keys.update({f"deltatune:{label}": label, **({f"peft:{label}": label} if not peft_refusal(case(label)) else {})})
    refused: dict[str, str] = {}  # the peft codec cannot hold this delta on this model
    not_applicable: dict[str, str] = {}  # the method itself cannot adapt this model
    for key, label in keys.items():
        if label in not_applicable:
            continue
        try:
            model = train_model(key.partition(":")[0], label, base, spec).train()
        except (ConfigError, NotApplicableError, TargetError) as error:
            kind, reason = refusal(error, key.partition(":")[0])
            (not_applicable if kind == "not_applicable" else refused)[label] = reason
            continue
        cases[key], trainable[key] = make_train_step(model, batch_for(args, model), floor=label == "floor")
    timings = interleaved(cases, args.get("repeats", 15), args.get("warmup", 2), args.get("budget_s", BUDGET_S))
    out = {"kind": "train_ratios", "ms": timings.as_dict(), "trainable": trainable, "ratios": {}}
    if not_applicable:
        out["not_applicable"] = not_applicable
    for label in (m for m in methods if m not in not_applicable):
        ours, theirs = f"deltatune:{label}", f"peft:{label}"
        out["ratios"][label] = {"floor": timings.ratio(ours, "floor"), "full": timings.ratio(ours, "full")}
        if theirs in cases:
            out["ratios"][label].update(peft=timings.ratio(ours, theirs), peft_floor=timings.ratio(theirs, "floor"))
        else:
            out.setdefault("no_peft", {})[label] = refused.get(label) or peft_refusal(case(label))
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def inference_ratios(args: dict) -> dict:
    """Unmerged against merged latency in both libraries, at batch 1 and the model's batch,
    and merge + unmerge, save and load times, each set of cases interleaved."""
    name, seed = args.get("model", "minilm"), args.get("seed", 0)
    spec, repeats, warmup = MODELS[name], args.get("repeats", 15), args.get("warmup", 2)
    base = build_model(name, seed).eval()
    models = dict(zip(("deltatune:unmerged", "peft:unmerged"), trained_copies(base, 1, spec, seed + 1)))
    for lib in ("deltatune", "peft"):
        models[f"{lib}:merged"] = copy.deepcopy(models[f"{lib}:unmerged"])
    dt.merge(models["deltatune:merged"])
    models["peft:merged"].merge_adapter()
    out: dict = {"kind": "inference_ratios", "adapted_modules": len(
        {key.rpartition(".")[0] for key, _ in dt.delta_parameters(models["deltatune:unmerged"], "d0")})}
    for b in (1, args.get("batch", spec.batch)):
        batch = batch_for({**args, "batch": b}, base)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            timings = interleaved({k: (lambda m=m: m(**inputs)) for k, m in models.items()}, repeats, warmup,
                                  args.get("budget_s", BUDGET_S))
        out[f"b{b}"] = {"ms": timings.as_dict(), "ratios": {
            "deltatune_unmerged_over_merged": timings.ratio("deltatune:unmerged", "deltatune:merged"),
            "peft_unmerged_over_merged": timings.ratio("peft:unmerged", "peft:merged"),
            "unmerged_deltatune_over_peft": timings.ratio("deltatune:unmerged", "peft:unmerged"),
            "merged_deltatune_over_peft": timings.ratio("deltatune:merged", "peft:merged")}}
    ours, theirs = models["deltatune:unmerged"], models["peft:unmerged"]
    merges = interleaved({"deltatune": lambda: (dt.merge(ours), dt.unmerge(ours)),
                          "peft": lambda: (theirs.merge_adapter(), theirs.unmerge_adapter())}, repeats, warmup)
    out["merge_unmerge"] = {"ms": merges.as_dict(), "ratio": merges.ratio("deltatune", "peft")}
    with tempfile.TemporaryDirectory() as tmp:
        # peft saves an adapter not named "default" in a sub-folder of that name
        folders = {"deltatune": Path(tmp) / "dt", "peft": Path(tmp) / "peft" / "d0"}
        saves = interleaved({"deltatune": lambda: dt.save(ours, folders["deltatune"]),
                             "peft": lambda: theirs.save_pretrained(folders["peft"].parent)}, repeats, warmup)
        out["save"] = {"ms": saves.as_dict(), "ratio": saves.ratio("deltatune", "peft")}
        out["file_bytes"] = {"deltatune": sum((folders["deltatune"] / f).stat().st_size
                                              for f in ("delta.safetensors", "delta.json")),
                             "peft": sum((folders["peft"] / f).stat().st_size
                                         for f in ("adapter_model.safetensors", "adapter_config.json"))}
        import peft

        # each load needs a fresh copy of the base, made before the timing: few rounds, so that
        # SmolLM2's copies stay within a few GiB
        rounds = min(repeats, LOAD_ROUNDS)
        fresh = [copy.deepcopy(base) for _ in range(2 * (rounds + 1))]
        loads = interleaved({"deltatune": lambda: dt.load(fresh.pop(), folders["deltatune"]),
                             "peft": lambda: peft.PeftModel.from_pretrained(fresh.pop(), folders["peft"])},
                            rounds, 1)
        out["load"] = {"ms": loads.as_dict(), "ratio": loads.ratio("deltatune", "peft")}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


def mixed_train(args: dict) -> dict:
    """``deltas`` LoRA deltas (r=8 on q, k, v, o) trained in one step over a batch whose rows
    are split among them, against the same deltas trained one after the other, each on its
    own rows (same rows, same optimizer, same number of parameter updates)."""
    name, deltas, seed = args.get("model", "minilm"), args.get("deltas", 4), args.get("seed", 0)
    spec = MODELS[name]
    base = build_model(name, seed)
    rows = args.get("batch", spec.batch)
    batch = make_batch(base, rows, args.get("seq", spec.seq), seed, spec.task)
    names = [f"d{i}" for i in range(deltas)]
    row_names = [names[i % deltas] for i in range(rows)]
    groups = {n: torch.tensor([i for i, m in enumerate(row_names) if m == n]) for n in names}

    def model_with_deltas():
        model = copy.deepcopy(base).train()
        for n in names:
            with_delta(model, CASES["lora"], spec, name=n)
        dt.set_trainable(model, names)
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    together, opt_together = model_with_deltas()
    apart, opt_apart = model_with_deltas()

    def one_step() -> None:
        together(**batch, delta_ids=row_names).loss.backward()
        opt_together.step()
        opt_together.zero_grad(set_to_none=True)

    def one_after_another() -> None:
        for n, idx in groups.items():
            with dt.using(apart, n):
                apart(**{k: v[idx] for k, v in batch.items()}).loss.backward()
        opt_apart.step()
        opt_apart.zero_grad(set_to_none=True)

    timings = interleaved({"one_step": one_step, "one_after_another": one_after_another},
                          args.get("repeats", 15), args.get("warmup", 2), args.get("budget_s", BUDGET_S))
    return {"kind": "mixed_train", "deltas": deltas, "rows": rows, "ms": timings.as_dict(),
            "ratio": timings.ratio("one_step", "one_after_another"), "peak_rss_mib": peak_rss_mib()}
