"""Run the measurements and write bench/results.{json,md,png}.

    deltatune bench                     # MiniLM and SmolLM2, 15 timed rounds after 2 warm-ups
    deltatune bench --models minilm     # one model
    deltatune bench --tiny              # tiny random BERT and Llama, 3 rounds (smoke run)
    deltatune bench --only train        # train|memory|equivalence|inference|mixed|mixed_train|decode|swap|serve|precision

Every ratio (deltatune / peft, / the frozen floor, / merged, / the base) comes from its cases
run interleaved in one process (interleave.py: alternating order, warm-up rounds, median of
the per-round ratios with quartiles as the spread). Peak memory comes from one fresh process
per library and method, so each peak is that configuration's own. Every worker process runs
``sys.executable`` with OMP_NUM_THREADS=2 and ``torch.set_num_threads(2)``; the system load
average is recorded next to each.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import deltatune
from . import report
from .cases import ALL_LINEAR, BASELINES, MODELS, benchmarkable, case, default_methods, peft_refusal


PARTS = ["train", "memory", "equivalence", "inference", "mixed", "mixed_train", "decode", "swap", "serve", "precision"]
THREADS = 2


def run_worker(kind: str, args: dict, timeout: int = 900) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), MKL_NUM_THREADS=str(THREADS),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "deltatune.bench.measure", kind, json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {kind} {args} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["loadavg_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
    print(f"  {args['model']} {kind} {args.get('lib', '')} {args.get('method', '')}: {result['wall_s']} s, "
          f"load {result['loadavg_1min']}", file=sys.stderr, flush=True)
    return result


def versions() -> dict:
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "deltatune": deltatune.__version__, "python": platform.python_version()}


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _x(summary: dict) -> dict:
    """A ratio summary as a row's fields: the median and its quartiles."""
    return {"value": summary["median"], "spread": [summary["q1"], summary["q3"]], "n": summary["n"]}


def ratio_row(model: str, method: str, metric: str, ours: dict | None, theirs: dict | None = None,
              unit: str = "x", **extra) -> dict:
    """A row whose values are interleaved ratios (medians over rounds, quartiles as spread)."""
    a, b = (_x(ours) if ours else None), (_x(theirs) if theirs else None)
    return {"model": model, "method": method, "metric": metric, "deltatune": a and a["value"],
            "peft": b and b["value"], "ratio": ratio(a and a["value"], b and b["value"]), "unit": unit,
            "spread": a and a["spread"], "peft_spread": b and b["spread"], "n": a and a["n"], **extra}


def time_row(model: str, method: str, metric: str, ms: dict, vs_peft: dict | None = None) -> dict:
    """A row of absolute times (ms medians) from one interleaved run, with the dt/peft ratio."""
    return {"model": model, "method": method, "metric": metric, "deltatune": ms["deltatune"]["median"],
            "peft": ms["peft"]["median"] if "peft" in ms else None,
            "ratio": vs_peft["median"] if vs_peft else None, "spread": [vs_peft["q1"], vs_peft["q3"]] if vs_peft else None,
            "unit": "ms", "n": ms["deltatune"]["n"]}


def collect(model: str, repeats: int, warmup: int, parts: set[str], steps: int,
            methods: list[str] | None = None, fresh_variants: list[str] | None = None,
            fresh_from: Path | None = None, precision_parts: list[str] | None = None,
            precision_variants: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run the workers; return (rows, raw worker outputs)."""
    methods = default_methods() if methods is None else methods
    rows: list[dict] = []
    raw: dict = {}
    common = {"model": model, "repeats": repeats, "warmup": warmup, "threads": THREADS}
    spec = MODELS[model]
    if "train" in parts:
        raw["train"] = tr = run_worker("train_ratios", {**common, "methods": methods}, timeout=7200)
        rows += [{"model": model, "method": method, "metric": "not_applicable", "reason": reason,
                  "unit": None}
                 for method, reason in tr.get("not_applicable", {}).items()]
        for method in [*BASELINES, *(m for m in methods if m not in tr.get("not_applicable", {}))]:
            key = method if method in BASELINES else f"deltatune:{method}"
            r = tr["ratios"].get(method, {})
            rows.append({"model": model, "method": method, "metric": "train_step", "unit": "ms",
                         "deltatune": tr["ms"][key]["median"], "peft": tr["ms"].get(f"peft:{method}", {}).get("median"),
                         "ratio": r.get("peft", {}).get("median"), "spread": _spread(r.get("peft")),
                         "floor_ratio": r.get("floor", {}).get("median"), "floor_spread": _spread(r.get("floor")),
                         "peft_floor_ratio": r.get("peft_floor", {}).get("median"),
                         "full_ratio": r.get("full", {}).get("median"), "trainable": tr["trainable"][key],
                         "peft_trainable": tr["trainable"].get(f"peft:{method}"), "n": tr["ms"][key]["n"],
                         "no_peft": tr.get("no_peft", {}).get(method)})
    if "memory" in parts:  # peak RSS is a process's own: one fresh process per library and method
        memory = {}
        for method in [*BASELINES, *methods]:
            libs = ["none"] if method in BASELINES else ["deltatune"] if peft_refusal(case(method)) else ["deltatune", "peft"]
            for lib in libs:
                result = run_worker("train_step", {**common, "lib": lib, "method": method, "repeats": 2, "warmup": 1})
                if "refused" not in result:
                    memory[(lib, method)] = result
        raw["memory"] = list(memory.values())
        floor = memory[("none", "floor")]["peak_rss_mib"]
        for method in [*BASELINES, *methods]:
            if ("deltatune", method) not in memory and ("none", method) not in memory:
                continue  # the method cannot adapt this model (the train part records why)
            ours = memory.get(("deltatune", method), memory.get(("none", method)))["peak_rss_mib"]
            theirs = memory[("peft", method)]["peak_rss_mib"] if ("peft", method) in memory else None
            rows.append({"model": model, "method": method, "metric": "peak_rss", "deltatune": ours, "peft": theirs,
                         "ratio": ratio(ours, theirs), "unit": "MiB", "floor": floor, "floor_ratio": ratio(ours, floor)})
    if "equivalence" in parts:
        eq = run_worker("equivalence", {"model": model, "steps": steps, "threads": THREADS})
        raw["equivalence"] = eq
        rows.append({"model": model, "method": "lora", "metric": f"loss_max_rel_diff_{steps}_steps",
                     "deltatune": eq["max_rel_diff"], "peft": None, "ratio": None, "unit": "relative"})
    if "inference" in parts:
        raw["inference"] = inf = run_worker("inference_ratios", common, timeout=3600)
        for b in (1, spec.batch):
            r = inf[f"b{b}"]["ratios"]
            rows.append(ratio_row(model, "lora-all-linear", f"unmerged_over_merged_b{b}",
                                  r["deltatune_unmerged_over_merged"], r["peft_unmerged_over_merged"]))
            rows.append(time_row(model, "lora-all-linear", f"latency_unmerged_b{b}",
                                 {k.split(":")[0]: v for k, v in inf[f"b{b}"]["ms"].items() if k.endswith(":unmerged")},
                                 r["unmerged_deltatune_over_peft"]))
        for key in ("merge_unmerge", "save", "load"):
            rows.append(time_row(model, "lora-all-linear", f"{key}_time", inf[key]["ms"], inf[key]["ratio"]))
        size = inf["file_bytes"]
        rows.append({"model": model, "method": "lora-all-linear", "metric": "delta_file_size", "unit": "KiB",
                     "deltatune": size["deltatune"] / 1024, "peft": size["peft"] / 1024,
                     "ratio": ratio(size["deltatune"], size["peft"])})
    if "mixed" in parts and spec.task == "classification":
        raw["mixed"] = run_worker("mixed", common, timeout=3600)
        rows += mixed_rows(model, raw["mixed"])
    if "mixed_train" in parts and spec.task == "classification":
        raw["mixed_train"] = mt = run_worker("mixed_train", common, timeout=3600)
        rows.append(ratio_row(model, "lora-qkvo", f"mixed_train_{mt['rows']}x{mt['deltas']}", mt["ratio"],
                              one_step_ms=mt["ms"]["one_step"]["median"],
                              one_after_another_ms=mt["ms"]["one_after_another"]["median"]))
    if "decode" in parts and spec.task == "causal_lm":
        raw["decode"] = run_worker("decode", common, timeout=7200)
        rows += decode_rows(model, raw["decode"])
    if "precision" in parts and spec.task == "causal_lm" and spec.packaged:
        raw["precision"] = precision_raw(model, repeats, warmup, steps, fresh_variants, fresh_from, precision_parts,
                                         precision_variants)
        rows += precision_rows(model, raw["precision"])
    if "swap" in parts and spec.task == "classification":
        raw["swap"] = run_worker("swap", common)
        rows += swap_rows(model, raw["swap"])
    if "serve" in parts and spec.task == "classification" and spec.packaged:
        raw["serve"] = run_worker("serve", common)
        rows += raw["serve"]["rows"]
    return rows, raw


#: (variant, libraries) of the precision runs: peft where it can hold a LoRA on that base on CPU
PRECISION_RUNS = (("fp32", ("deltatune", "peft")), ("bf16", ("deltatune",)), ("autocast", ("deltatune",)),
                  ("int8", ("deltatune", "peft")), ("4bit", ("deltatune", "peft")), ("fp32-gc", ("deltatune",)),
                  ("int8-gc", ("deltatune",)), ("4bit-gc", ("deltatune",)))


def precision_raw(model: str, repeats: int, warmup: int, steps: int, fresh: list[str] | None = None,
                  fresh_from: Path | None = None, parts: list[str] | None = None,
                  variants: list[str] | None = None) -> dict:
    """Fresh processes per variant and library (peak RSS, test loss; only the variants in
    ``fresh`` when given, none when ``fresh_from`` names the saved ``runs`` of an earlier
    bench), then the interleaved ratios of every variant."""
    runs = json.loads(fresh_from.read_text())["runs"] if fresh_from else {}
    for variant, libs in () if fresh_from else PRECISION_RUNS:
        if fresh is not None and variant not in fresh:
            continue
        for lib in libs:
            runs[f"{lib}:{variant}"] = run_worker("precision_run", {"model": model, "variant": variant, "lib": lib,
                                                                    "steps": steps}, timeout=7200)
    ratios = run_worker("precision_ratios", {"model": model, "repeats": repeats, "warmup": warmup,
                                             "parts": parts or ["train", "decode"],
                                             **({"variants": variants} if variants else {})}, timeout=4 * 3600)
    return {"runs": runs, "ratios": ratios}


def precision_rows(model: str, raw: dict) -> list[dict]:
    """Per variant: peak RSS and test loss (against float32, and peft's on the same base), the
    interleaved train step over float32's, and greedy decoding tokens per second."""
    runs, ratios = raw["runs"], raw["ratios"]
    fp32 = runs["deltatune:fp32"]
    out = []
    for variant, _ in PRECISION_RUNS:
        ours, theirs = runs.get(f"deltatune:{variant}"), runs.get(f"peft:{variant}")
        if ours is None:  # no fresh process for this variant: its interleaved times only
            ours = {"peak_rss_mib": None, "test_loss": None, "steps": fp32["steps"]}
        out.append({"model": model, "method": "lora", "metric": f"precision_{variant}", "unit": "MiB",
                    "deltatune": ours["peak_rss_mib"], "peft": theirs and theirs["peak_rss_mib"],
                    "ratio": ratio(ours["peak_rss_mib"], theirs and theirs["peak_rss_mib"]),
                    "rss_over_fp32": ratio(ours["peak_rss_mib"], fp32["peak_rss_mib"]),
                    "test_loss": ours["test_loss"], "peft_test_loss": theirs and theirs["test_loss"],
                    "loss_vs_fp32": None if ours["test_loss"] is None else ratio(ours["test_loss"], fp32["test_loss"]) - 1,
                    "step_over_fp32": (ratios["train_over_fp32"].get(variant) or {}).get("median"),
                    "step_spread": _spread(ratios["train_over_fp32"].get(variant)),
                    "peft_step_over_fp32": (ratios["train_over_fp32"].get(f"peft:{variant}") or {}).get("median"),
                    "decode_tokens_per_s": ratios["decode_tokens_per_s"].get(variant),
                    "peft_decode_tokens_per_s": ratios["decode_tokens_per_s"].get(f"peft:{variant}"),
                    "steps": ours["steps"], "test_rows": fp32.get("test_rows")})
    return out


def _spread(summary: dict | None) -> list[float] | None:
    return [summary["q1"], summary["q3"]] if summary else None


SWAP_METRICS = (("set_active_ms", "switch_set_active"), ("replace_in_place_ms", "switch_replace_in_place"),
                ("load_from_disk_ms", "delta_load_from_disk"), ("cache_hit_ms", "cache_hit"),
                ("cache_miss_ms", "cache_miss_load_and_evict"), ("forward_1_row_ms", "forward_1_row_for_scale"))


def swap_rows(model: str, raw: dict) -> list[dict]:
    """Switching costs on a live model (no peft equivalent is timed)."""
    return [{"model": model, "method": "lora-qkvo+head", "metric": metric, "deltatune": raw[key]["median"],
             "peft": None, "ratio": None, "unit": "ms"} for key, metric in SWAP_METRICS]


def mixed_rows(model: str, raw: dict) -> list[dict]:
    """One row per (rows, deltas) case: deltatune's mixed batch and peft's over the base alone
    on the same rows, and deltatune over running each delta's rows as their own batch."""
    out = []
    for case, result in raw["cases"].items():
        ms, r = result["ms"], result["ratios"]
        out.append(ratio_row(model, "lora-all-linear", f"mixed_batch_{case}", r["deltatune_over_base"],
                             r["peft_over_base"], base_ms=ms["base"]["median"], deltatune_ms=ms["deltatune"]["median"],
                             peft_ms=ms["peft"]["median"], split_ms=ms["split"]["median"],
                             split_ratio=r["deltatune_over_split"]["median"]))
    return out


def decode_rows(model: str, raw: dict) -> list[dict]:
    """One row per decode case: deltatune and peft over the base on the same prompts."""
    out = []
    for case, result in raw["cases"].items():
        ms, r = result["ms"], result["ratios"]
        out.append(ratio_row(model, "lora-all-linear", f"decode_{case}", r["deltatune_over_base"], r["peft_over_base"],
                             base_ms=ms["base"]["median"], deltatune_ms=ms["deltatune"]["median"],
                             peft_ms=ms["peft"]["median"], tokens_per_s=result["tokens_per_s"],
                             new_tokens=raw["new_tokens"]))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS) + " (default minilm,smollm2)")
    parser.add_argument("--methods", default=None,
                        help="comma list of delta methods to time, or 'all' (default: LoRA, DoRA, (IA)3, prompt, prefix "
                             "and every other method peft also has)")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT and Llama, 3 repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=50, help="equivalence-guard training steps (first model only)")
    parser.add_argument("--only", default=",".join(PARTS),
                        help="comma list of parts (mixed, mixed_train, swap and serve run on classification models, "
                             "decode on causal LMs)")
    parser.add_argument("--fresh-variants", default=None,
                        help="precision part: comma list of the base variants that get a fresh training process (peak "
                             "RSS, test loss; default all); every variant's step and decoding are timed regardless")
    parser.add_argument("--fresh-from", type=Path, default=None,
                        help="precision part: reuse the fresh-process rows saved in this JSON file (its 'runs') "
                             "instead of running them again; only the interleaved ratios are measured")
    parser.add_argument("--precision-parts", default="train,decode",
                        help="precision part: which interleaved timings to take, train and/or decode (default both)")
    parser.add_argument("--precision-variants", default=None,
                        help="precision part: comma list of the base variants whose step and decoding are timed "
                             "(default all; fp32 is always needed as the reference)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.{json,md,png}")


def run(opts: argparse.Namespace) -> int:
    models = (opts.models or ("tiny,tiny-llama" if opts.tiny else "minilm,smollm2")).split(",")
    methods = (default_methods() if opts.methods is None else benchmarkable() if opts.methods == "all"
               else opts.methods.split(","))
    for given, known, what in ((models, MODELS, "model"), (methods, [*default_methods(), *benchmarkable()], "method")):
        unknown = [m for m in given if m not in known]
        if unknown:
            raise SystemExit(f"unknown bench {what} {unknown[0]!r}; use {', '.join(known)}")
    repeats = opts.repeats or (3 if opts.tiny else 15)
    parts = set(opts.only.split(","))
    start = time.time()
    rows, raw, settings = [], {}, {}
    for i, model in enumerate(models):
        print(f"bench: {model}, {repeats} repeats after {opts.warmup} warm-ups, {THREADS} threads", file=sys.stderr)
        # the equivalence guard compares values, not times: once, on the first model
        model_rows, raw[model] = collect(model, repeats, opts.warmup, parts if i == 0 else parts - {"equivalence"},
                                         opts.steps, methods,
                                         opts.fresh_variants.split(",") if opts.fresh_variants else None,
                                         opts.fresh_from, opts.precision_parts.split(","),
                                         opts.precision_variants.split(",") if opts.precision_variants else None)
        rows += model_rows
        spec = MODELS[model]
        settings[model] = {"task": spec.task, "batch": spec.batch, "seq": spec.seq}
    meta = {"versions": versions(), "threads": THREADS,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count()},
            "settings": {"models": settings, "dtype": "float32", "repeats": repeats, "warmup": opts.warmup,
                         "statistic": "median", "cases": {m: case(m) for m in methods}, "inference": ALL_LINEAR,
                         "optimizer": "AdamW lr=1e-3"},
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(start)),
            "duration_s": round(time.time() - start, 1)}
    opts.out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "rows": rows, "raw": raw}
    (opts.out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    (opts.out / "results.md").write_text(report.markdown(data))
    report.chart(data, opts.out / "results.png")
    print(f"wrote {opts.out}/results.json, results.md, results.png in {meta['duration_s']} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
