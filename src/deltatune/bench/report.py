"""results.md (tables + targets met / missed) and results.png from the rows of results.json."""

from __future__ import annotations

from pathlib import Path


def _num(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) < 0.01 and value != 0):
        return f"{value:.2e}"
    return f"{value:,.{digits}f}"


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _find(rows: list[dict], metric: str, method: str | None = None) -> dict | None:
    return next((r for r in rows if r["metric"] == metric and (method is None or r["method"] == method)), None)


def targets(rows: list[dict]) -> list[tuple[str, bool | None, str]]:
    """(target, met?, detail) for each target of issue #4; None where it was not measured."""
    out = []
    lora = _find(rows, "train_step", "lora")
    if lora:
        r = lora["ratio"]
        out.append(("LoRA train step deltatune/peft <= 1.00", r <= 1.00,
                    f"{r:.3f} ({lora['deltatune']:.1f} vs {lora['peft']:.1f} ms)"
                    + ("" if r <= 1.00 else f": missed by {100 * (r - 1):.1f}%")))
        f = lora["floor_ratio"]
        out.append(("LoRA train step <= 1.05 x frozen floor", f <= 1.05,
                    f"{f:.3f} x floor ({lora['floor']:.1f} ms); peft {lora['peft_floor_ratio']:.3f} x"
                    + ("" if f <= 1.05 else f": missed by {100 * (f - 1.05):.1f} points")))
    mem = [r for r in rows if r["metric"] == "peak_rss" and r["peft"] is not None]
    if mem:
        worse = [r for r in mem if r["deltatune"] > r["peft"]]
        detail = ", ".join(f"{r['method']} {r['deltatune']:.0f} vs {r['peft']:.0f} MiB (+{r['deltatune'] - r['peft']:.0f})"
                           for r in worse) or "all methods at or below peft"
        out.append(("peak memory no higher than peft's", not worse, detail))
    inf = _find(rows, "unmerged_over_merged_b32")
    if inf:
        x = inf["deltatune"]
        out.append(("unmerged inference within 10% of merged at batch 32", x <= 1.10,
                    f"deltatune {x:.3f} x merged, peft {inf['peft']:.3f} x"
                    + ("" if x <= 1.10 else f": missed by {100 * (x - 1.10):.1f} points")))
    eq = next((r for r in rows if r["metric"].startswith("loss_max_rel_diff")), None)
    if eq:
        out.append(("LoRA losses match peft within 1e-4 relative (guard)", eq["deltatune"] <= 1e-4,
                    f"max relative difference {eq['deltatune']:.2e}"))
    for case, limit in (("32x16", 1.20), ("64x64", 1.30)):
        mix = _find(rows, f"mixed_batch_{case}")
        if mix:
            x = mix["base_ratio"]
            rows_, deltas = case.split("x")
            out.append((f"mixed batch of {rows_} rows over {deltas} deltas within {limit:.2f} x the base alone",
                        x <= limit, f"deltatune {x:.3f} x base, peft {mix['peft_base_ratio']:.3f} x"
                        + ("" if x <= limit else f": missed by {100 * (x - limit):.1f} points")))
    return out


def _header(data: dict) -> list[str]:
    s, v = data["settings"], data["versions"]
    models = "; ".join(f"`{name}` ({m['task']}, batch {m['batch']} x {m['seq']} random tokens)"
                       for name, m in s["models"].items())
    lines = [
        "# deltatune vs peft benchmark", "",
        f"Models: {models}; fixed seeds, {s['dtype']}, {data['threads']} threads, median of {s['repeats']} runs "
        f"after {s['warmup']} warm-ups, each library and configuration in its own fresh process. LoRA {s['lora']}; "
        f"{s['virtual_tokens']} virtual tokens for prompt / prefix; {s['optimizer']}.", "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, deltatune {v['deltatune']}, "
        f"Python {v['python']}; {data['machine']['platform']}, {data['machine']['cpu_count']} CPUs. "
        f"Run {data['started']}, {data['duration_s']:.0f} s. Regenerate with `make bench` (`deltatune bench`).", "",
    ]
    loads = [x for model in data.get("raw", {}).values() for r in model.get("train_step", [])
             for x in r.get("loadavg_1min", [])]
    if loads:
        lines += [f"1-minute load average around the train-step workers: {min(loads):.2f} to {max(loads):.2f} "
                  f"(on {data['machine']['cpu_count']} CPUs; above ~0.5 means other work shared the cores and "
                  "the times are noisier).", ""]
    if s["repeats"] < 20:
        lines += [f"**Short run: {s['repeats']} timed repeats (issue #4 asks for at least 20), "
                  f"{s['warmup']} warm-up(s)**; `make bench` defaults to 20.", ""]
    return lines


def _model_section(name: str, rows: list[dict], raw: dict) -> list[str]:
    lines = []
    train = [r for r in rows if r["metric"] == "train_step"]
    if train:
        lines += ["", f"### {name}: train step (forward + backward + AdamW step)", "",
                  "`floor`: no delta, everything frozen, backward to `inputs_embeds` (no optimizer step). "
                  "`full`: every parameter trains. A classifier's head trains in every delta run, in both libraries.",
                  "", "| method | deltatune ms | peft ms | deltatune/peft | deltatune/floor | peft/floor | "
                  "deltatune/full | trainable (dt / peft) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in train:
            trainable = f"{r['trainable']:,}" + (f" / {r['peft_trainable']:,}" if r.get("peft_trainable") is not None else "")
            lines.append(f"| {r['method']} | {_num(r['deltatune'])} | {_num(r['peft'])} | {_ratio(r['ratio'])} | "
                         f"{_ratio(r['floor_ratio'])} | {_ratio(r.get('peft_floor_ratio'))} | "
                         f"{_ratio(r['full_ratio'])} | {trainable} |")
    mem = [r for r in rows if r["metric"] == "peak_rss"]
    if mem:
        lines += ["", f"### {name}: peak memory (ru_maxrss of the fresh worker, model load included)", "",
                  "| method | deltatune MiB | peft MiB | deltatune/peft | deltatune/floor |",
                  "|---|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['method']} | {_num(r['deltatune'], 0)} | {_num(r['peft'], 0)} | "
                         f"{_ratio(r['ratio'])} | {_ratio(r['floor_ratio'])} |")
    mixed = [r for r in rows if r["metric"].startswith("mixed_batch_")]
    if mixed:
        lines += ["", f"### {name}: mixed batches (forward, no grad; row i uses LoRA delta i mod deltas)", "",
                  "`base`: the plain model on the same rows. `split`: deltatune running each delta's rows as "
                  "their own batch. peft: `adapter_names`.", "",
                  "| rows x deltas | deltatune ms | peft ms | base ms | split ms | deltatune/base | peft/base | "
                  "deltatune/peft | deltatune/split |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in mixed:
            lines.append(f"| {r['metric'].removeprefix('mixed_batch_')} | {_num(r['deltatune'])} | {_num(r['peft'])} | "
                         f"{_num(r['base'])} | {_num(r['split'])} | {_ratio(r['base_ratio'])} | "
                         f"{_ratio(r['peft_base_ratio'])} | {_ratio(r['ratio'])} | {_ratio(r['split_ratio'])} |")
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
    other = [r for r in rows if r["metric"] not in ("train_step", "peak_rss") and not r["metric"].startswith("mixed_")
             and r not in swap and r not in served]
    if other:
        lines += ["", f"### {name}: equivalence guard and inference (LoRA r=8 on every Linear of the body)", "",
                  "| method | metric | deltatune | peft | deltatune/peft | unit |", "|---|---|---:|---:|---:|---|"]
        for r in other:
            digits = 3 if r["unit"] in ("x", "ms") and (r["deltatune"] or 0) < 10 else 1
            lines.append(f"| {r['method']} | {r['metric']} | {_num(r['deltatune'], digits)} | "
                         f"{_num(r['peft'], digits)} | {_ratio(r['ratio'])} | {r['unit']} |")
    eq = raw.get("equivalence")
    if eq and eq["steps"] < 50:
        lines += ["", f"**The equivalence guard ran {eq['steps']} steps, not 50.**"]
    return lines


def markdown(data: dict) -> str:
    rows = data["rows"]
    models = list(data["settings"]["models"])
    lines = _header(data)
    lines += [f"## Targets (issue #4, on `{models[0]}`)", "", "| target | met | measured |", "|---|---|---|"]
    for name, ok, detail in targets([r for r in rows if r["model"] == models[0]]):
        lines.append(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")
    for model in models:
        lines += ["", f"## {model}"]
        lines += _model_section(model, [r for r in rows if r["model"] == model], data.get("raw", {}).get(model, {}))
    lines += ["", "`delta_load_time` excludes copying the base model; `delta_file_size` is the tensor file plus "
              "its JSON description (deltatune's JSON also carries the base fingerprint). "
              "The equivalence guard runs both libraries in one process (dropout off, same batches, "
              "deltatune's initial A/B copied into peft's parameters) because it compares values, not times."]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(data["settings"]["models"])
    fig, axes = plt.subplots(len(models), 3, figsize=(16.5, 4.2 * len(models)), squeeze=False)
    for row_axes, model in zip(axes, models):
        rows = [r for r in data["rows"] if r["model"] == model]
        panels = ((lambda r: r["metric"] == "train_step", "train step", "ms"),
                  (lambda r: r["metric"] == "peak_rss", "peak RSS", "MiB"),
                  (lambda r: r["metric"].startswith("latency_"), "inference latency (LoRA all Linear)", "ms"))
        for ax, (keep, title, unit) in zip(row_axes, panels):
            items = [r for r in rows if keep(r)]
            if not items:
                ax.axis("off")
                continue
            labels = [r["method"] if r["metric"] in ("train_step", "peak_rss") else r["metric"].removeprefix("latency_")
                      for r in items]
            xs = range(len(items))
            ax.bar([x - 0.2 for x in xs], [r["deltatune"] for r in items], 0.4, label="deltatune")
            ax.bar([x + 0.2 for x in xs], [r["peft"] or 0 for r in items], 0.4, label="peft")
            ax.set_xticks(list(xs), labels, rotation=30, ha="right")
            ax.set_title(f"{model}: {title}")
            ax.set_ylabel(unit)
            ax.legend()
    fig.suptitle(f"deltatune vs peft, {data['threads']} threads, median")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
