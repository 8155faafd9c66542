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
    return out


def markdown(data: dict) -> str:
    rows, s, v = data["rows"], data["settings"], data["versions"]
    loads = [x for r in data.get("raw", {}).get("train_step", []) for x in r.get("loadavg_1min", [])]
    lines = [
        "# deltatune vs peft benchmark", "",
        f"Model `{s['model']}` ({s['task']}), batch {s['batch']} x {s['seq']} random tokens (fixed seed), "
        f"{s['dtype']}, {data['threads']} threads, median of {s['repeats']} runs after {s['warmup']} warm-ups, "
        f"each library and configuration in its own fresh process. LoRA {s['lora']}; "
        f"{s['virtual_tokens']} virtual tokens for prompt / prefix; {s['optimizer']}.", "",
        f"torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, deltatune {v['deltatune']}, "
        f"Python {v['python']}; {data['machine']['platform']}, {data['machine']['cpu_count']} CPUs. "
        f"Run {data['started']}, {data['duration_s']:.0f} s.", "",
    ]
    if loads:
        lines += [f"1-minute load average around the train-step workers: {min(loads):.2f} to {max(loads):.2f} "
                  f"(on {data['machine']['cpu_count']} CPUs; above ~0.5 means other work shared the cores and "
                  "the times are noisier).", ""]
    if s["repeats"] < 20:
        lines += [f"**Short run: {s['repeats']} timed repeats (issue #4 asks for at least 20), "
                  f"{s['warmup']} warm-up(s)**; `make bench` (`python -m bench.run`) defaults to 20.", ""]
    eq_raw = data.get("raw", {}).get("equivalence")
    if eq_raw and eq_raw["steps"] < 50:
        lines += [f"**The equivalence guard ran {eq_raw['steps']} steps, not 50.**", ""]
    lines += ["## Targets (issue #4)", "", "| target | met | measured |", "|---|---|---|"]
    for name, ok, detail in targets(rows):
        lines.append(f"| {name} | {'yes' if ok else 'NO'} | {detail} |")
    train = [r for r in rows if r["metric"] == "train_step"]
    if train:
        lines += ["", "## Train step (forward + backward + AdamW step)", "",
                  "`floor`: no delta, everything frozen, backward to `inputs_embeds` (no optimizer step). "
                  "`full`: every parameter trains. The classifier head trains in every delta run, in both libraries.",
                  "", "| method | deltatune ms | peft ms | deltatune/peft | deltatune/floor | peft/floor | "
                  "deltatune/full | trainable (dt / peft) |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in train:
            trainable = f"{r['trainable']:,}" + (f" / {r['peft_trainable']:,}" if r.get("peft_trainable") is not None else "")
            lines.append(f"| {r['method']} | {_num(r['deltatune'])} | {_num(r['peft'])} | {_ratio(r['ratio'])} | "
                         f"{_ratio(r['floor_ratio'])} | {_ratio(r.get('peft_floor_ratio'))} | "
                         f"{_ratio(r['full_ratio'])} | {trainable} |")
    mem = [r for r in rows if r["metric"] == "peak_rss"]
    if mem:
        lines += ["", "## Peak memory (ru_maxrss of the fresh worker, model load included)", "",
                  "| method | deltatune MiB | peft MiB | deltatune/peft | deltatune/floor |",
                  "|---|---:|---:|---:|---:|"]
        for r in mem:
            lines.append(f"| {r['method']} | {_num(r['deltatune'], 0)} | {_num(r['peft'], 0)} | "
                         f"{_ratio(r['ratio'])} | {_ratio(r['floor_ratio'])} |")
    other = [r for r in rows if r["metric"] not in ("train_step", "peak_rss")]
    if other:
        lines += ["", "## Equivalence guard and inference (LoRA r=8 on every encoder Linear)", "",
                  "| method | metric | deltatune | peft | deltatune/peft | unit |", "|---|---|---:|---:|---:|---|"]
        for r in other:
            digits = 3 if r["unit"] in ("x", "ms") and (r["deltatune"] or 0) < 10 else 1
            lines.append(f"| {r['method']} | {r['metric']} | {_num(r['deltatune'], digits)} | "
                         f"{_num(r['peft'], digits)} | {_ratio(r['ratio'])} | {r['unit']} |")
        lines += ["", "`delta_load_time` excludes copying the base model; `delta_file_size` is the tensor file plus "
                  "its JSON description (deltatune's JSON also carries the base fingerprint).",
                  "The equivalence guard runs both libraries in one process (dropout off, same batches, "
                  "deltatune's initial A/B copied into peft's parameters) because it compares values, not times."]
    return "\n".join(lines) + "\n"


def chart(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    train = [r for r in rows if r["metric"] == "train_step"]
    mem = [r for r in rows if r["metric"] == "peak_rss"]
    inf = [r for r in rows if r["metric"].startswith("latency_")]
    panels = [(t, title, unit) for t, title, unit in ((train, "train step", "ms"), (mem, "peak RSS", "MiB"),
                                                      (inf, "inference latency (LoRA all Linear)", "ms")) if t]
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 4.2), squeeze=False)
    for ax, (items, title, unit) in zip(axes[0], panels):
        labels = [r["method"] if r["metric"] in ("train_step", "peak_rss") else r["metric"].removeprefix("latency_")
                  for r in items]
        xs = range(len(items))
        ax.bar([x - 0.2 for x in xs], [r["deltatune"] for r in items], 0.4, label="deltatune")
        ax.bar([x + 0.2 for x in xs], [r["peft"] or 0 for r in items], 0.4, label="peft")
        ax.set_xticks(list(xs), labels, rotation=30, ha="right")
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend()
    fig.suptitle(f"deltatune vs peft, {data['settings']['model']}, {data['threads']} threads, median")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
