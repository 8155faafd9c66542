"""results.md (tables + targets met / missed) and results.png from the rows of results.json."""

from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) < 0.01 and value != 0):
        return f"{value:.2e}"
    return f"{value:,.{digits}f}"


def _ratio(value, spread=None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" + (f" [{spread[0]:.2f}, {spread[1]:.2f}]" if spread else "")


def _find(rows: list[dict], metric: str, method: str | None = None) -> dict | None:
    return next((r for r in rows if r["metric"] == metric and (method is None or r["method"] == method)), None)


def _limit(name: str, value: float, limit: float, detail: str) -> tuple[str, bool, str]:
    ok = value <= limit
    return name, ok, f"{value:.3f} {detail}" + ("" if ok else f"; missed by {100 * (value - limit):.1f} points")


#: (metric, field, limit, target) of issue #11, for the model whose rows have the metric
RATIO_TARGETS = (
    ("unmerged_over_merged_b1", "deltatune", 1.10, "unmerged / merged LoRA latency, batch 1"),
    ("unmerged_over_merged_b32", "deltatune", 1.08, "unmerged / merged LoRA latency, batch 32"),
    ("mixed_batch_32x16", "deltatune", 1.15, "mixed batch, 32 rows over 16 deltas / base alone"),
    ("mixed_batch_64x64", "deltatune", 1.20, "mixed batch, 64 rows over 64 deltas / base alone"),
    ("decode_1x1", "deltatune", 1.05, "greedy decode, batch 1, unmerged LoRA / base"),
    ("decode_8x4", "deltatune", 1.15, "greedy decode, 8 prompts over 4 deltas / base"),
)


#: (variant, field, limit, target) of issue #15 for the precision rows: at most ``limit``
PRECISION_TARGETS = (
    ("int8", "rss_over_fp32", 0.60, "int8 base: peak RSS of training / float32's"),
    ("4bit", "rss_over_fp32", 0.45, "4-bit base: peak RSS of training / float32's"),
    ("int8-gc", "rss_over_fp32", 0.60, "int8 base, gradient checkpointing: peak RSS of training / float32's"),
    ("4bit-gc", "rss_over_fp32", 0.45, "4-bit base, gradient checkpointing: peak RSS of training / float32's"),
    ("int8", "loss_vs_fp32", 0.02, "int8 base: test loss after the same steps, relative to float32's"),
    ("4bit", "loss_vs_fp32", 0.04, "4-bit base: test loss after the same steps, relative to float32's"),
    ("bf16", "step_over_fp32", 1 / 1.4, "bf16 base: train step / float32's (1.4x faster)"),
)


def precision_targets(rows: list[dict]) -> list[tuple[str, bool, str]]:
    out = []
    for variant, field, limit, name in PRECISION_TARGETS:
        for row in (r for r in rows if r["metric"] == f"precision_{variant}" and r.get(field) is not None):
            out.append(_limit(f"`{row['model']}` {name} <= {limit:.2f}", row[field], limit, ""))
    return out


def _precision_section(name: str, rows: list[dict]) -> list[str]:
    chosen = [r for r in rows if r["metric"].startswith("precision_")]
    if not chosen:
        return []
    lines = ["", f"### {name}: the base's precision (LoRA r=8 on q, k, v, o, float32; {chosen[0]['steps']} steps on "
             "chatterbot, batch 8 x 128)", "",
             f"Peak RSS and test loss (the first {chosen[0].get('test_rows') or 'all'} test rows) from one fresh process "
             "per variant and library (model load, quantisation, "
             "training and evaluation included); train steps and greedy decoding (16 tokens) of every variant "
             "interleaved in one process, steps over deltatune's float32 step. `autocast`: the float32 base under "
             "`torch.autocast(\"cpu\", bfloat16)`; `-gc`: with gradient checkpointing (each block's activations "
             "recomputed in the backward pass).", "",
             "| base | peak MiB | / fp32 | peft MiB | test loss | vs fp32 | peft test loss | step / fp32 | "
             "peft step / fp32 | decode tokens/s | peft decode tokens/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in chosen:
        lines.append(f"| {r['metric'].removeprefix('precision_')} | {_num(r['deltatune'], 0)} | "
                     f"{_ratio(r['rss_over_fp32'])} | {_num(r['peft'], 0)} | {_num(r['test_loss'], 4)} | "
                     f"{'-' if r['loss_vs_fp32'] is None else format(r['loss_vs_fp32'], '+.2%')} | {_num(r['peft_test_loss'], 4)} | "
                     f"{_ratio(r['step_over_fp32'], r.get('step_spread'))} | {_ratio(r.get('peft_step_over_fp32'))} | "
                     f"{_num(r['decode_tokens_per_s'])} | {_num(r.get('peft_decode_tokens_per_s'))} |")
    return lines


def targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, detail) for each target measured in ``rows``."""
    out = []
    lora = next((r for r in rows if r["metric"] == "train_step" and r["method"] == "lora"), None)
    if lora:
        model = f"`{lora['model']}`"
        out.append(_limit(f"{model} LoRA train step deltatune/peft <= 1.00", lora["ratio"], 1.00,
                          f"({lora['deltatune']:.1f} vs {lora['peft']:.1f} ms)"))
        out.append(_limit(f"{model} LoRA train step / frozen floor <= 1.05", lora["floor_ratio"], 1.05,
                          f"x floor; peft {lora['peft_floor_ratio']:.3f} x"))
    for metric, field, limit, name in RATIO_TARGETS:
        for row in (r for r in rows if r["metric"] == metric):
            peft = f"; peft {row['peft']:.3f}" if row.get("peft") is not None else ""
            spread = row.get("spread")
            detail = (f"[{spread[0]:.2f}, {spread[1]:.2f}]" if spread else "") + peft
            out.append(_limit(f"`{row['model']}` {name} <= {limit:.2f}", row[field], limit, detail))
    mem = [r for r in rows if r["metric"] == "peak_rss" and r["peft"] is not None]
    if mem:
        worse = [r for r in mem if r["deltatune"] > r["peft"]]
        detail = ", ".join(f"{r['model']} {r['method']} {r['deltatune']:.0f} vs {r['peft']:.0f} MiB "
                           f"(+{r['deltatune'] - r['peft']:.0f})" for r in worse) or "every method at or below peft"
        out.append(("peak memory no higher than peft's", not worse, detail))
    eq = next((r for r in rows if r["metric"].startswith("loss_max_rel_diff")), None)
    if eq:
        out.append(("LoRA losses match peft within 1e-4 relative (guard)", eq["deltatune"] <= 1e-4,
                    f"max relative difference {eq['deltatune']:.2e}"))
    return out + precision_targets(rows)


def _header(data: dict) -> list[str]:
    s, v = data["settings"], data["versions"]
    models = "; ".join(f"`{name}` ({m['task']}, batch {m['batch']} x {m['seq']} random tokens)"
                       for name, m in s["models"].items())
    lines = [
        "# deltatune vs peft benchmark", "",
        f"Models: {models}; fixed seeds, {s['dtype']}, {data['threads']} threads; {s['optimizer']}.", "",
        "Deltas, as deltatune configs (`roles` resolved to each model's modules from its structure): "
        + "; ".join(f"`{label}` {_config(c)}" for label, c in s.get("cases", {}).items())
        + f"; inference rows: {_config(s.get('inference', {}))}. peft runs the same deltas, exported from deltatune's "
        "through each method's peft codec and loaded with `PeftModel.from_pretrained`, so both libraries start from "
        "the same weights on the same modules; a method peft cannot represent has no peft column.", "",
        f"**Ratios** come from the cases run interleaved in one process: {s['warmup']} warm-up rounds, then "
        f"up to {s['repeats']} rounds in which every case runs once (order alternating between rounds); a ratio "
        "is the median over rounds of the per-round ratio, `[q1, q3]` its quartiles. **Peak memory** comes from "
        "one fresh process per library and method.", "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, deltatune {v['deltatune']}, "
        f"Python {v['python']}; {data['machine']['platform']}, {data['machine']['cpu_count']} CPUs. "
        f"Run {data['started']}, {data['duration_s']:.0f} s. Regenerate with `make bench` (`deltatune bench`).", "",
    ]
    loads = [x for model in data.get("raw", {}).values() for part in model.values() if isinstance(part, dict)
             for x in part.get("loadavg_1min", [])]
    if loads:
        lines += [f"1-minute load average around the workers: {min(loads):.2f} to {max(loads):.2f} "
                  f"(on {data['machine']['cpu_count']} CPUs; above ~2 means other work shared the cores).", ""]
    if s["repeats"] < 15:
        lines += [f"**Short run: {s['repeats']} timed rounds (issue #11 asks for at least 15)**; "
                  "`make bench` defaults to 15.", ""]
    return lines


def _config(case: dict) -> str:
    fields = [f"{k}=[{', '.join(v)}]" if isinstance(v, (list, tuple)) else f"{k}={v}" for k, v in case.items() if k != "method"]
    return "(" + ("; ".join(fields) or "its defaults") + ")"


def _train_section(name: str, rows: list[dict]) -> list[str]:
    train = [r for r in rows if r["metric"] == "train_step"]
    if not train:
        return []
    lines = ["", f"### {name}: train step (forward + backward + AdamW step), interleaved", "",
             "`floor`: no delta, everything frozen, backward to `inputs_embeds` (no optimizer step). "
             "`full`: every parameter trains. A classifier's head trains in every delta run, in both libraries.",
             "", "| method | deltatune ms | peft ms | deltatune/peft | deltatune/floor | peft/floor | "
             "deltatune/full | trainable (dt / peft) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in train:
        trainable = f"{r['trainable']:,}" + (f" / {r['peft_trainable']:,}" if r.get("peft_trainable") is not None else "")
        lines.append(f"| {r['method']} | {_num(r['deltatune'])} | {_num(r['peft'])} | "
                     f"{_ratio(r['ratio'], r.get('spread'))} | {_ratio(r['floor_ratio'], r.get('floor_spread'))} | "
                     f"{_ratio(r.get('peft_floor_ratio'))} | {_ratio(r.get('full_ratio'))} | {trainable} |")
    lines += [f"\n`{r['method']}` has no peft column: {r['no_peft']}." for r in train if r.get("no_peft")]
    lines += [f"\n`{r['method']}` does not apply to this model: {r['reason']}." for r in rows
              if r["metric"] == "not_applicable"]
    return lines


def _memory_section(name: str, rows: list[dict]) -> list[str]:
    mem = [r for r in rows if r["metric"] == "peak_rss"]
    if not mem:
        return []
    lines = ["", f"### {name}: peak memory of a training process (ru_maxrss of a fresh worker, model load included)",
             "", "| method | deltatune MiB | peft MiB | deltatune/peft | deltatune/floor |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {_num(r['deltatune'], 0)} | {_num(r['peft'], 0)} | {_ratio(r['ratio'])} | "
              f"{_ratio(r['floor_ratio'])} |" for r in mem]
    return lines


def _ratio_section(title: str, note: str, rows: list[dict], prefix: str, columns: list[tuple[str, str]]) -> list[str]:
    chosen = [r for r in rows if r["metric"].startswith(prefix)]
    if not chosen:
        return []
    head = "| case | deltatune | peft |" + "".join(f" {c} |" for c, _ in columns)
    lines = ["", title, "", note, "", head, "|---|---:|---:|" + "---:|" * len(columns)]
    for r in chosen:
        extra = "".join(f" {_num(r.get(key), 3 if 'ratio' in key else 1)} |" for _, key in columns)
        lines.append(f"| {r['metric'].removeprefix(prefix)} | {_ratio(r['deltatune'], r.get('spread'))} | "
                     f"{_ratio(r['peft'], r.get('peft_spread'))} |{extra}")
    return lines


def _model_section(name: str, rows: list[dict]) -> list[str]:
    lines = _train_section(name, rows) + _memory_section(name, rows) + _precision_section(name, rows)
    lines += _ratio_section(
        f"### {name}: unmerged / merged latency (LoRA r=8 on every Linear of the body), interleaved",
        "Each library's unmerged model over its own merged model.", rows, "unmerged_over_merged_", [])
    lines += _ratio_section(
        f"### {name}: mixed batches / the base alone on the same rows (forward, no grad; row i uses delta i mod deltas)",
        "peft: `adapter_names`. `split`: deltatune running each delta's rows as their own batch.", rows,
        "mixed_batch_", [("base ms", "base_ms"), ("deltatune ms", "deltatune_ms"), ("peft ms", "peft_ms"),
                         ("split ms", "split_ms"), ("deltatune/split", "split_ratio")])
    lines += _ratio_section(
        f"### {name}: training several deltas in one step / one after the other",
        "LoRA r=8 on q, k, v, o; the batch's rows split among the deltas; one AdamW step either way.", rows,
        "mixed_train_", [("one step ms", "one_step_ms"), ("one after another ms", "one_after_another_ms")])
    lines += _ratio_section(
        f"### {name}: greedy decode with unmerged LoRA / the base on the same prompts (prompts x deltas)",
        "Batch 1: each library's active adapter; 8x4: deltatune `delta_ids`, peft `adapter_names`.", rows,
        "decode_", [("base ms", "base_ms"), ("deltatune ms", "deltatune_ms"), ("peft ms", "peft_ms")])
    swap = [r for r in rows if r["method"] == "lora-qkvo+head"]
    if swap:
        lines += ["", f"### {name}: switching deltas on a live model (two LoRA deltas + heads, medians)", "",
                  "| metric | ms |", "|---|---:|"]
        lines += [f"| {r['metric']} | {_num(r['deltatune'], 3)} |" for r in swap]
    served = [r for r in rows if r["method"] == "serve"]
    if served:
        lines += ["", f"### {name}: `deltatune serve` under load ({served[0]['case'].replace('_', ' ')}; "
                  "HTTP clients in the same process, 1 torch thread)", "", "| metric | value | unit |", "|---|---:|---|"]
        lines += [f"| {r['metric']} | {_num(r['deltatune'])} | {r['unit']} |" for r in served]
    other = [r for r in rows if r["unit"] in ("ms", "KiB", "relative") and r["metric"] != "train_step"
             and not r["metric"].startswith("precision_")
             and r not in swap and r not in served]
    if other:
        lines += ["", f"### {name}: equivalence guard, latency and file operations (LoRA r=8 on every Linear)", "",
                  "| method | metric | deltatune | peft | deltatune/peft | unit |", "|---|---|---:|---:|---:|---|"]
        for r in other:
            lines.append(f"| {r['method']} | {r['metric']} | {_num(r['deltatune'], 3 if (r['deltatune'] or 0) < 10 else 1)} | "
                         f"{_num(r['peft'], 3 if (r['peft'] or 0) < 10 else 1)} | {_ratio(r['ratio'], r.get('spread'))} | "
                         f"{r['unit']} |")
    return lines


def markdown(data: dict) -> str:
    rows = data["rows"]
    models = list(data["settings"]["models"])
    lines = _header(data)
    lines += ["## Targets", "", "| target | met | measured |", "|---|---|---|"]
    for name, ok, detail in targets(rows):
        lines.append(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")
    for model in models:
        lines += ["", f"## {model}"]
        lines += _model_section(model, [r for r in rows if r["model"] == model])
    lines += ["", "`load_time` excludes copying the base model; `delta_file_size` is the tensor file plus "
              "its JSON description (deltatune's JSON also carries the base fingerprint). "
              "The equivalence guard runs both libraries in one process (dropout off, same batches, "
              "deltatune's initial A/B copied into peft's parameters) because it compares values, not times."]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    """Per model: the interleaved ratios of deltatune and peft against their references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["settings"]["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(13, 4.2 * len(models)), squeeze=False)
    for (ax,), model in zip(axes, models):
        items = [(f"{r['method']} step/floor", r["floor_ratio"], r.get("peft_floor_ratio"))
                 for r in data["rows"] if r["model"] == model and r["metric"] == "train_step"
                 and r["method"] not in ("floor", "full")]
        items += [(r["metric"], r["deltatune"], r["peft"]) for r in data["rows"] if r["model"] == model
                  and r["unit"] == "x" and not r["metric"].startswith("mixed_train")]
        if not items:
            ax.axis("off")
            continue
        xs = range(len(items))
        ax.bar([x - 0.2 for x in xs], [i[1] for i in items], 0.4, label="deltatune")
        ax.bar([x + 0.2 for x in xs], [i[2] or 0 for i in items], 0.4, label="peft")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_xticks(list(xs), [i[0] for i in items], rotation=30, ha="right")
        ax.set_title(f"{model}: time over its reference (1.0 = no overhead)")
        ax.set_ylabel("x")
        ax.legend()
    fig.suptitle(f"deltatune vs peft, {data['threads']} threads, interleaved medians")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
