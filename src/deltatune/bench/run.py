"""Run every measurement in its own Python process and write bench/results.{json,md,png}.

    deltatune bench                     # MiniLM and SmolLM2, 20 timed repeats after 3 warm-ups
    deltatune bench --models minilm     # one model
    deltatune bench --tiny              # tiny random BERT and Llama, 3 repeats (smoke run)
    deltatune bench --only train        # train|memory|equivalence|inference|mixed|swap|serve

Each (library, method) runs in a fresh ``sys.executable`` with OMP_NUM_THREADS=2 and
``torch.set_num_threads(2)``, so its peak RSS is its own and no library warms the other's
caches. The system load average is recorded next to every measurement.
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
from .workers import MODELS


METHODS = ["lora", "dora", "ia3", "prompt", "prefix"]
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


def collect(model: str, repeats: int, warmup: int, parts: set[str], steps: int,
            methods: list[str] = METHODS) -> tuple[list[dict], dict]:
    """Run the workers; return (rows, raw worker outputs)."""
    rows: list[dict] = []
    raw: dict = {}
    common = {"model": model, "repeats": repeats, "warmup": warmup, "threads": THREADS}
    if parts & {"train", "memory"}:
        train = {}
        for method in ["floor", "full"] + methods:
            libs = ["deltatune", "peft"] if method in methods else ["none"]
            for lib in libs:
                train[(lib, method)] = run_worker("train_step", {**common, "lib": lib, "method": method})
        raw["train_step"] = [v for v in train.values()]
        floor = train[("none", "floor")]["step_ms"]["median"]
        full = train[("none", "full")]["step_ms"]["median"]
        for method in ["floor", "full"] + methods:
            ours = train.get(("deltatune", method), train.get(("none", method)))
            theirs = train.get(("peft", method))
            dt_ms, pf_ms = ours["step_ms"]["median"], theirs["step_ms"]["median"] if theirs else None
            if "train" in parts:
                rows.append({"model": model, "method": method, "metric": "train_step", "deltatune": dt_ms,
                             "peft": pf_ms, "ratio": ratio(dt_ms, pf_ms), "unit": "ms", "floor": floor,
                             "floor_ratio": ratio(dt_ms, floor), "peft_floor_ratio": ratio(pf_ms, floor),
                             "full": full, "full_ratio": ratio(dt_ms, full), "peft_full_ratio": ratio(pf_ms, full),
                             "trainable": ours["trainable"], "peft_trainable": theirs["trainable"] if theirs else None})
            if "memory" in parts:
                dt_mem = ours["peak_rss_mib"]
                pf_mem = theirs["peak_rss_mib"] if theirs else None
                rows.append({"model": model, "method": method, "metric": "peak_rss", "deltatune": dt_mem,
                             "peft": pf_mem, "ratio": ratio(dt_mem, pf_mem), "unit": "MiB",
                             "floor": train[("none", "floor")]["peak_rss_mib"],
                             "floor_ratio": ratio(dt_mem, train[("none", "floor")]["peak_rss_mib"])})
    if "equivalence" in parts:
        eq = run_worker("equivalence", {"model": model, "steps": steps, "threads": THREADS})
        raw["equivalence"] = eq
        rows.append({"model": model, "method": "lora", "metric": f"loss_max_rel_diff_{steps}_steps",
                     "deltatune": eq["max_rel_diff"], "peft": None, "ratio": None, "unit": "relative"})
    if "inference" in parts:
        inf = {lib: run_worker("inference", {**common, "lib": lib}) for lib in ("deltatune", "peft")}
        raw["inference"] = inf
        big = MODELS[model].batch
        metrics = [("unmerged_b1", "latency_unmerged_b1", "ms"), ("merged_b1", "latency_merged_b1", "ms"),
                   (f"unmerged_b{big}", f"latency_unmerged_b{big}", "ms"), (f"merged_b{big}", f"latency_merged_b{big}", "ms"),
                   ("merge", "merge_time", "ms"), ("unmerge", "unmerge_time", "ms"), ("save", "save_time", "ms"),
                   ("load", "delta_load_time", "ms")]
        for key, metric, unit in metrics:
            a, b = inf["deltatune"][key]["median"], inf["peft"][key]["median"]
            rows.append({"model": model, "method": "lora-all-linear", "metric": metric, "deltatune": a, "peft": b,
                         "ratio": ratio(a, b), "unit": unit})
        for b in (1, big):
            a = ratio(inf["deltatune"][f"unmerged_b{b}"]["median"], inf["deltatune"][f"merged_b{b}"]["median"])
            p = ratio(inf["peft"][f"unmerged_b{b}"]["median"], inf["peft"][f"merged_b{b}"]["median"])
            rows.append({"model": model, "method": "lora-all-linear", "metric": f"unmerged_over_merged_b{b}",
                         "deltatune": a, "peft": p, "ratio": ratio(a, p), "unit": "x"})
        for key, metric in (("file_bytes", "delta_file_size"), ("tensor_file_bytes", "delta_tensor_file_size")):
            a, b = inf["deltatune"][key] / 1024, inf["peft"][key] / 1024
            rows.append({"model": model, "method": "lora-all-linear", "metric": metric, "deltatune": a, "peft": b,
                         "ratio": ratio(a, b), "unit": "KiB"})
    if "mixed" in parts and MODELS[model].task == "classification":
        raw["mixed"] = {lib: run_worker("mixed", {**common, "lib": lib}) for lib in ("base", "deltatune", "split", "peft")}
        rows += mixed_rows(model, raw["mixed"])
    if "swap" in parts and MODELS[model].task == "classification":
        raw["swap"] = run_worker("swap", common)
        rows += swap_rows(model, raw["swap"])
    if "serve" in parts and MODELS[model].task == "classification":
        raw["serve"] = run_worker("serve", common)
        rows += raw["serve"]["rows"]
    return rows, raw


SWAP_METRICS = (("set_active_ms", "switch_set_active"), ("replace_in_place_ms", "switch_replace_in_place"),
                ("load_from_disk_ms", "delta_load_from_disk"), ("cache_hit_ms", "cache_hit"),
                ("cache_miss_ms", "cache_miss_load_and_evict"), ("forward_1_row_ms", "forward_1_row_for_scale"))


def swap_rows(model: str, raw: dict) -> list[dict]:
    """Switching costs on a live model (no peft equivalent is timed)."""
    return [{"model": model, "method": "lora-qkvo+head", "metric": metric, "deltatune": raw[key]["median"],
             "peft": None, "ratio": None, "unit": "ms"} for key, metric in SWAP_METRICS]


def mixed_rows(model: str, raw: dict) -> list[dict]:
    """One row per (rows, deltas) case: deltatune's mixed batch against peft's, the base alone
    on the same rows, and each delta's rows run as their own batch."""
    out = []
    for case in raw["deltatune"]["cases"]:
        base, ours, theirs, split = (raw[lib]["cases"][case]["median"] for lib in ("base", "deltatune", "peft", "split"))
        out.append({"model": model, "method": "lora-all-linear", "metric": f"mixed_batch_{case}", "deltatune": ours,
                    "peft": theirs, "ratio": ratio(ours, theirs), "unit": "ms", "base": base,
                    "base_ratio": ratio(ours, base), "peft_base_ratio": ratio(theirs, base), "split": split,
                    "split_ratio": ratio(ours, split)})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=None, help="comma list of " + ", ".join(MODELS) + " (default minilm,smollm2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of delta methods to time")
    parser.add_argument("--tiny", action="store_true", help="tiny random BERT and Llama, 3 repeats (smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 20; 3 with --tiny)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="equivalence-guard training steps (first model only)")
    parser.add_argument("--only", default="train,memory,equivalence,inference,mixed,swap,serve",
                        help="comma list of parts (mixed, swap and serve run on classification models only)")
    parser.add_argument("--out", type=Path, default=Path("bench"), help="folder for results.{json,md,png}")


def run(opts: argparse.Namespace) -> int:
    models = (opts.models or ("tiny,tiny-llama" if opts.tiny else "minilm,smollm2")).split(",")
    methods = opts.methods.split(",")
    for given, known, what in ((models, MODELS, "model"), (methods, METHODS, "method")):
        unknown = [m for m in given if m not in known]
        if unknown:
            raise SystemExit(f"unknown bench {what} {unknown[0]!r}; use {', '.join(known)}")
    repeats = opts.repeats or (3 if opts.tiny else 20)
    parts = set(opts.only.split(","))
    start = time.time()
    rows, raw, settings = [], {}, {}
    for i, model in enumerate(models):
        print(f"bench: {model}, {repeats} repeats after {opts.warmup} warm-ups, {THREADS} threads", file=sys.stderr)
        # the equivalence guard compares values, not times: once, on the first model
        model_rows, raw[model] = collect(model, repeats, opts.warmup, parts if i == 0 else parts - {"equivalence"},
                                         opts.steps, methods)
        rows += model_rows
        spec = MODELS[model]
        settings[model] = {"task": spec.task, "batch": spec.batch, "seq": spec.seq, "lora_targets": list(spec.lora)}
    meta = {"versions": versions(), "threads": THREADS,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpu_count": os.cpu_count()},
            "settings": {"models": settings, "dtype": "float32", "repeats": repeats, "warmup": opts.warmup,
                         "statistic": "median", "lora": "r=8, alpha=16, dropout 0", "virtual_tokens": 20,
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
