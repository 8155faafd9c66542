"""Compress a trained delta at several settings and measure each on the task's test split.

Writes ``results/compression.md`` and ``results/compression.json``. The delta is the LoRA
(r=8 on query/value, plus the trained head) of a movie-reviews run on MiniLM; each setting
is compressed with ``deltatune.algebra.compress``, loaded back with ``deltatune.load`` and
evaluated on the same 1,058-snippet test split as the uncompressed delta.

    python results/compression.py --delta /tmp/deltas/movie-reviews
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.algebra.compress import compress, describe_scheme
from deltatune.io.atomic import write_text_atomic
from deltatune.train.batches import encode
from deltatune.train.job import TrainJob, prepare
from deltatune.train.metrics import evaluate

#: (density, bits) per setting; (None, None) is the delta as trained
SETTINGS = [(None, None), (0.5, None), (0.25, None), (0.1, None), (None, 8), (None, 2), (0.5, 8), (0.25, 2)]
HERE = Path(__file__).resolve().parent


def measure(delta: Path) -> dict:
    """Every setting's size, ratio, reconstruction error and test metrics."""
    job = dataclasses.replace(TrainJob.from_yaml(delta / "config.yaml"), progress=False)
    splits, loaded = prepare(job)
    test = encode(splits.test, loaded.tokenizer, splits.task, job.max_length, splits.labels)
    model = loaded.model.eval()
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for index, (density, bits) in enumerate(SETTINGS):
            folder, report = delta, None
            if density is not None or bits is not None:
                folder = Path(work) / f"setting-{index}"
                report = compress(delta, folder, density=density, bits=bits)
            started = time.perf_counter()
            dt.load(model, folder, name=f"setting{index}")
            with torch.no_grad():
                metrics = evaluate(model, test, num_labels=max(2, len(splits.labels)))
            dt.delete(model, f"setting{index}")
            size = (folder / "delta.safetensors").stat().st_size
            rows.append({"setting": "as trained" if report is None else describe_scheme(density, bits),
                         "density": density, "bits": bits, "bytes": size,
                         "relative_error": 0.0 if report is None else report.relative_error,
                         "accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"],
                         "eval_seconds": round(time.perf_counter() - started, 1)})
    for row in rows:
        row["ratio"] = rows[0]["bytes"] / row["bytes"]
        row["accuracy_change"] = row["accuracy"] - rows[0]["accuracy"]
    recorded = json.loads((delta / "metrics.json").read_text())["test"]["accuracy"] if (delta / "metrics.json").is_file() else None
    return {"delta": str(delta), "model": job.model, "data": splits.describe(), "method": dt.read_meta(delta)["method"],
            "config": dt.read_meta(delta)["config"], "recorded_test_accuracy": recorded, "rows": rows}


def markdown(result: dict) -> str:
    config = result["config"]
    lines = [
        "# Compressing a trained delta",
        "",
        (f"LoRA (r={config['r']}, alpha={config['alpha']:g}, on query and value, plus the trained classifier head) "
        f"trained on {result['data']['name']} with {result['model']} (MiniLM-L6), compressed with `deltatune compress` "
        f"and evaluated on the test split ({result['data']['sizes']['test']:,} snippets, seed {result['data']['seed']}). "
        "Sizes are those of `delta.safetensors`; the relative error is the Frobenius error of the compressed "
        "tensors (the head's bias, a vector, is stored as it was). Produced by `results/compression.py`."),
        "",
        "| setting | file size | ratio | rel. error | accuracy | change | macro-F1 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['setting']} | {row['bytes'] / 1024:,.1f} KiB | {row['ratio']:.2f}x | "
                     f"{row['relative_error']:.3f} | {row['accuracy']:.4f} | {100 * row['accuracy_change']:+.2f} pt | "
                     f"{row['macro_f1']:.4f} |")
    lines += ["", ("Ternary codes are packed five to a byte (1.6 bits); a sparse tensor stores a one-bit-per-element "
              "mask plus its kept values; int8 and ternary use one float scale per tensor."), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delta", type=Path, default=Path("/tmp/deltas/movie-reviews"))
    parser.add_argument("--out", type=Path, default=HERE / "compression")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a shared machine
    result = measure(args.delta)
    write_text_atomic(args.out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    write_text_atomic(args.out.with_suffix(".md"), markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
