"""Merge two task LoRAs with every method and measure each merge on both tasks' test splits.

Writes ``results/merging.md`` and ``results/merging.json``. The deltas are two LoRAs (r=8
on query/value, plus a trained classifier head each) trained with ``deltatune train`` on
MiniLM: one on movie reviews, one on SMS spam. Each merge is evaluated on each task with
that task's own head (``heads=<index>``), on the same seeded test split the delta was
tested on after training; the rows "base + head" (the task's head on the frozen base) and
"alone" (the task's own LoRA) bracket them.

    python results/merging.py --deltas /tmp/deltas/movie-reviews /tmp/deltas/sms-spam
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.io.atomic import write_text_atomic
from deltatune.train.batches import encode
from deltatune.train.job import TrainJob, prepare
from deltatune.train.metrics import evaluate

HERE = Path(__file__).resolve().parent
#: (row label, merge_deltas options)
MERGES = [
    ("linear 0.5/0.5", {"method": "linear", "weights": [0.5, 0.5]}),
    ("cat (1/1)", {"method": "cat"}),
    ("svd r=8 (0.5/0.5)", {"method": "svd", "rank": 8}),
    ("ties d=0.5 (1/1)", {"method": "ties", "density": 0.5}),
    ("dare_ties d=0.5 (1/1)", {"method": "dare_ties", "density": 0.5, "seed": 0}),
    ("dare_linear d=0.5 (0.5/0.5)", {"method": "dare_linear", "density": 0.5, "seed": 0}),
    ("magnitude_prune d=0.5 (0.5/0.5)", {"method": "magnitude_prune", "density": 0.5}),
    ("metrics, penalty 1", {"method": "metrics", "penalty": 1.0}),
]


def _head_only(model, source: Path) -> None:
    """The source's trained head on the frozen base, as the only active delta ``head``."""
    dt.load(model, source, name="source", activate=False)
    dt.attach(model, dt.HeadConfig(), name="head")
    for path in dt.read_meta(source)["modules_to_save"]:
        slot = model.get_submodule(path).deltas
        slot["head"].copy.load_state_dict(slot["source"].copy.state_dict())
    dt.delete(model, "source")


def _evaluate_task(index: int, deltas: list[Path]) -> dict:
    """Every row's metrics on task ``index``'s test split, with that task's head."""
    job = dataclasses.replace(TrainJob.from_yaml(deltas[index] / "config.yaml"), progress=False)
    splits, loaded = prepare(job)
    test = encode(splits.test, loaded.tokenizer, splits.task, job.max_length, splits.labels)
    model = loaded.model.eval()
    num_labels = max(2, len(splits.labels))
    rows = {}

    def run(label: str, extra: dict | None = None) -> None:
        started = time.perf_counter()
        with torch.no_grad():
            metrics = evaluate(model, test, num_labels=num_labels)
        rows[label] = {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"], "loss": metrics["loss"],
                       "eval_seconds": round(time.perf_counter() - started, 1), **(extra or {})}
        print(f"  {splits.name:14s} {label:32s} accuracy {metrics['accuracy']:.4f}", flush=True)

    _head_only(model, deltas[index])
    run("base + head")
    dt.delete(model, "head")
    dt.load(model, deltas[index], name="alone")
    run("alone")
    dt.delete(model, "alone")
    own_only = [1.0 if i == index else 0.0 for i in range(len(deltas))]  # a check: must equal "alone"
    for label, options in [("linear own 1 / other 0", {"method": "linear", "weights": own_only}), *MERGES]:
        report = merge_deltas(model, deltas, heads=index, name="merged", **options)
        ranks = sorted({layer.rank for layer in report.layers if layer.rank is not None})
        run(label, {"result": report.result, "weights": list(report.weights), "ranks": ranks,
                    "nonzero": _mean([layer.nonzero for layer in report.layers]),
                    "energy_kept": _mean([layer.energy_kept for layer in report.layers])})
        dt.delete(model, "merged")
    recorded = json.loads((deltas[index] / "metrics.json").read_text())["test"]
    return {"task": splits.describe(), "recorded_test": recorded, "rows": rows}


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _geometry(deltas: list[Path]) -> dict:
    """Norms of the two LoRA updates (heads excluded) and their cosine similarity."""
    from deltatune.models.load import load_model

    model = load_model("minilm", "classification", 2).model
    vectors = [TaskVector.from_folder(model, d) for d in deltas]
    dense = [v.dense() for v in vectors]
    inner = sum(float((dense[0][k] * dense[1][k]).sum()) for k in dense[0] if k in dense[1])
    return {"norms": [v.norm() for v in vectors], "cosine": inner / (vectors[0].norm() * vectors[1].norm())}


def measure(deltas: list[Path]) -> dict:
    started = time.perf_counter()
    tasks = [_evaluate_task(index, deltas) for index in range(len(deltas))]
    metas = [dt.read_meta(d) for d in deltas]
    return {"deltas": [str(d) for d in deltas], "configs": [m["config"] for m in metas],
            "recorded_metrics": [m["metrics"] for m in metas], "geometry": _geometry(deltas), "tasks": tasks,
            "seconds": round(time.perf_counter() - started, 1)}


def _form(row: dict) -> str:
    if "result" not in row:
        return ""
    if row["result"] == "lora":
        return f"LoRA r={'/'.join(str(r) for r in row['ranks'])}"
    return f"dense, {row['nonzero']:.0%} non-zero"


def markdown(result: dict) -> str:
    names = [task["task"]["name"] for task in result["tasks"]]
    sizes = [task["task"]["sizes"]["test"] for task in result["tasks"]]
    config = result["configs"][0]
    lines = [
        "# Merging two task LoRAs",
        "",
        (f"Two LoRAs (r={config['r']}, alpha={config['alpha']:g}, on query and value of MiniLM-L6, plus a trained "
         f"classifier head each), trained with `deltatune train` ({result['recorded_metrics'][0]['steps']} steps) on "
         f"{' and '.join(names)}, merged with `deltatune.algebra.merge_deltas` and evaluated on each task's test split "
         f"({', '.join(f'{n}: {s:,} texts' for n, s in zip(names, sizes))}; the seeded split of training) with that "
         f"task's own head (`heads=<index>`). \"alone\" is each task's own LoRA, \"base + head\" its head on the "
         f"frozen base; \"linear own 1 / other 0\" is a check of the pipeline (it must equal \"alone\"). "
         f"Weights in brackets; d is the density. Produced by `results/merging.py` "
         f"({result['seconds']:.0f} s on this shared 2-core CPU)."),
        "",
        "| merge | result | " + " | ".join(f"{n} acc. | change" for n in names) + " | mean acc. |",
        "|---|---|" + "---:|---:|" * len(names) + "---:|",
    ]
    labels = list(result["tasks"][0]["rows"])
    for label in labels:
        cells, accuracies = [], []
        for task in result["tasks"]:
            row, alone = task["rows"][label], task["rows"]["alone"]["accuracy"]
            accuracies.append(row["accuracy"])
            cells += [f"{row['accuracy']:.4f}", "" if label == "alone" else f"{row['accuracy'] - alone:+.4f}"]
        form = _form(result["tasks"][0]["rows"][label])
        lines.append(f"| {label} | {form} | " + " | ".join(cells) + f" | {sum(accuracies) / len(accuracies):.4f} |")
    merges = [label for label, _ in MERGES]
    mean = {label: sum(t["rows"][label]["accuracy"] for t in result["tasks"]) / len(names) for label in merges}
    best = max(merges, key=mean.get)
    changes = [[t["rows"][label]["accuracy"] - t["rows"]["alone"]["accuracy"] for label in merges]
               for t in result["tasks"]]
    summary = "; ".join(f"{n}: {min(c):+.4f} to {max(c):+.4f}" for n, c in zip(names, changes))
    alone = sum(t["rows"]["alone"]["accuracy"] for t in result["tasks"]) / len(names)
    weights = result["tasks"][0]["rows"]["metrics, penalty 1"]["weights"]
    norms, cosine = result["geometry"]["norms"], result["geometry"]["cosine"]
    losses = [m["test"]["loss"] for m in result["recorded_metrics"]]
    lines += [
        "",
        (f"Accuracy change of the merges against each task's own LoRA: {summary}. The best mean accuracy is "
         f"{best}'s ({mean[best]:.4f}, against {alone:.4f} for the tasks' own LoRAs)."),
        "",
        (f"Metrics-weighted: w_i = exp(-penalty * loss_i) / sum_j exp(-penalty * loss_j) with each delta.json's "
         f"recorded test loss ({', '.join(f'{x:.3f}' for x in losses)}), giving weights "
         f"{', '.join(f'{w:.3f}' for w in weights)}. The loss is the one recorded at the end of training on the "
         f"same test split, so this row is not a held-out choice of weights."),
        "",
        (f"The two updates (Frobenius norm over all adapted layers, heads excluded) have norms "
         f"{' and '.join(f'{n:.2f}' for n in norms)} and cosine similarity {cosine:.3f}."),
        "",
        ("\"change\" is the accuracy difference to the task's own LoRA. linear, cat, svd and metrics are exact "
         "weighted sums of the two updates (cat at weights 1/1 equals running both LoRAs together); ties, dare_* "
         "and magnitude_prune work element-wise on each layer's dense update, so their result is a dense delta."),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", type=Path, nargs=2, default=[Path("/tmp/deltas/movie-reviews"),
                                                                 Path("/tmp/deltas/sms-spam")])
    parser.add_argument("--out", type=Path, default=HERE)
    parser.add_argument("--markdown-only", action="store_true", help="re-render merging.md from merging.json")
    args = parser.parse_args()
    if args.markdown_only:
        result = json.loads((args.out / "merging.json").read_text())
    else:
        result = measure(args.deltas)
        write_text_atomic(args.out / "merging.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(args.out / "merging.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
