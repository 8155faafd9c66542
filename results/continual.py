"""Continual learning: three packaged tasks in sequence, per-task deltas against full fine-tuning.

Writes ``results/continual.md`` and ``results/continual.json``. Per-task deltas: one LoRA
(with its own classifier head) per task on one shared frozen MiniLM, trained in order;
after each stage every task seen so far is evaluated with its own delta active. Sequential
full fine-tuning: one MiniLM body trained on each task in turn, each task keeping its own
head; after each stage every earlier task is evaluated with its own head. The script
asserts that per-task deltas leave every earlier task's test metrics exactly unchanged.

    OMP_NUM_THREADS=2 python results/continual.py
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import deltatune as dt
from deltatune.core.slot import get_state
from deltatune.data.datasets import load_dataset
from deltatune.io.artifact import TENSORS_FILE
from deltatune.io.atomic import write_text_atomic
from deltatune.methods.head import find_head
from deltatune.models.load import load_model
from deltatune.train.batches import encode
from deltatune.core.registry import get_method
from deltatune.train.loop import Settings
from deltatune.train.sequence import SequenceResult, Task, deltas_in_sequence, full_in_sequence

HERE = Path(__file__).resolve().parent
TASKS = ("movie-reviews", "sms-spam", "trec")


def options() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--steps", type=int, default=200, help="training steps per task")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="distinct texts per dataset (smoke runs)")
    parser.add_argument("--out", type=Path, default=HERE, help="folder for continual.md / continual.json")
    return parser.parse_args()


def load_tasks(args: argparse.Namespace) -> tuple[list, int]:
    """Every dataset's seeded split, and the head width that fits the task with the most labels."""
    splits = [load_dataset(name, args.seed, limit=args.limit) for name in args.tasks]
    return splits, max(2, *(len(s.labels) for s in splits))


def fresh_model(args: argparse.Namespace, width: int):
    torch.manual_seed(args.seed)  # the same head initialisation for both approaches
    return load_model(args.model, "classification", width)


def encoded_tasks(splits: list, tokenizer, max_length: int) -> list[Task]:
    return [Task(s.name, encode(s.train, tokenizer, s.task, max_length, s.labels),
                 encode(s.test, tokenizer, s.task, max_length, s.labels), max(2, len(s.labels))) for s in splits]


def parameter_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def delta_file_bytes(model, names: list[str]) -> dict[str, int]:
    """Each delta's ``delta.safetensors`` size, written to a scratch folder."""
    with tempfile.TemporaryDirectory() as scratch:
        return {name: (dt.save(model, Path(scratch) / name, name) / TENSORS_FILE).stat().st_size for name in names}


def cell(value: float | None, own: float | None) -> str:
    if value is None:
        return "–"
    if own is None or value == own:
        return f"{value:.4f}" + ("" if own is None else " (±0)")
    return f"{value:.4f} ({value - own:+.4f})"


def matrix_table(result: SequenceResult) -> list[str]:
    matrix = result.accuracy_matrix()
    own = [matrix[j][j] for j in range(len(result.order))]
    lines = ["| after training | " + " | ".join(result.order) + " |", "|---|" + "---:|" * len(result.order)]
    for i, row in enumerate(matrix):
        cells = [cell(v, None if i == j else own[j]) for j, v in enumerate(row)]
        lines.append(f"| {result.order[i]} | " + " | ".join(cells) + " |")
    return lines


def report(record: dict, deltas: SequenceResult, full: SequenceResult) -> str:
    s, storage = record["settings"], record["storage_bytes"]
    sizes = ", ".join(f"{t['name']}: {t['sizes']['train']:,} train / {t['sizes']['test']:,} test, {len(t['labels'])} labels"
                      for t in record["tasks"])
    mib = 1024 * 1024
    lines = [
        "# Continual learning: per-task deltas against sequential full fine-tuning",
        "",
        (f"{s['model']} on {', '.join(deltas.order)} in that order ({sizes}; deduplicated seeded splits, seed {s['seed']}). "
        f"Every stage: {s['steps']} steps of batch {s['batch_size']}, max length {s['max_length']}, training seed {s['seed']}. "
        f"Test-split accuracy; in brackets the change against the same task right after its own training."),
        "",
        (f"Per-task deltas: a LoRA (r={s['rank']}, alpha={2 * s['rank']}, on every layer's "
         f"{' and '.join(record['lora_targets'])}, lr {s['lr_lora']}) "
        f"with its own classifier head (`modules_to_save`) per task, all on one frozen base, trained one after "
        f"another with `deltatune.train.sequence.deltas_in_sequence`; a task is evaluated with its delta active."),
        "",
        *matrix_table(deltas),
        "",
        (f"Sequential full fine-tuning: one body trained on each task in turn (every parameter, lr {s['lr_full']}); "
        f"each task keeps its own head, and an earlier task is evaluated with its own head on the body as it is now "
        f"(`full_in_sequence`)."),
        "",
        *matrix_table(full),
        "",
        "| approach | trainable params per task | stored for all tasks | train time (all stages) |",
        "|---|---:|---:|---:|",
        (f"| per-task deltas | {deltas.trainable_parameters[0]:,} | frozen base {storage['base'] / mib:,.1f} MiB + deltas "
        f"{sum(storage['deltas'].values()) / mib:,.2f} MiB | {sum(deltas.train_seconds):.0f} s |"),
        (f"| sequential full fine-tuning | {full.trainable_parameters[0]:,} | body + {len(full.order)} heads "
        f"{storage['full'] / mib:,.1f} MiB (keeping each task's own model instead: {storage['full_per_task'] / mib:,.1f} MiB) "
        f"| {sum(full.train_seconds):.0f} s |"),
        "",
        (f"Every task's head has {record['head_width']} outputs (the most labels of any task); a task with fewer "
         f"labels trains on all of them (its loss pushes the unused ones down) and is scored over its own classes only "
         f"(`task_labels_only`). The per-task delta rows are checked "
        f"by the script: every earlier task's accuracy, macro-F1 and loss are bit-for-bit those right after its own "
        f"training (the base never changes and an inactive delta does not run). Delta sizes are the "
        f"`delta.safetensors` files (LoRA factors + head). Produced by `results/continual.py` in "
        f"{record['seconds']:.0f} s on this shared 2-core CPU (OMP_NUM_THREADS={record['threads']})."),
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    args = options()
    began = time.perf_counter()
    splits, width = load_tasks(args)
    loaded = fresh_model(args, width)
    model, head = loaded.model, find_head(loaded.model)
    tasks = encoded_tasks(splits, loaded.tokenizer, args.max_length)
    base_bytes = parameter_bytes(p for _, p in dt.base_parameters(model))

    common = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed, "progress": False}
    config = dt.LoRAConfig(r=args.rank, alpha=2.0 * args.rank, modules_to_save=(head,))
    deltas = deltas_in_sequence(model, tasks, config, Settings(lr=get_method("lora").default_lr, **common))
    for name in deltas.order:
        changed = deltas.changed_after_training(name)
        if changed:
            raise SystemExit(f"per-task delta of {name} changed after training {changed}: the base is not frozen")
    delta_bytes = delta_file_bytes(model, deltas.order)
    adapted = sorted({path.rsplit(".", 1)[-1] for path in get_state(model).sites[deltas.order[0]]} - {head})
    del model

    full_model = fresh_model(args, width).model
    full = full_in_sequence(full_model, tasks, Settings(lr=get_method("full").default_lr, **common), head=head)
    head_bytes = parameter_bytes(full_model.get_submodule(head).parameters())
    body_bytes = parameter_bytes(full_model.parameters()) - head_bytes

    record = {
        "settings": {"model": args.model, "steps": args.steps, "batch_size": args.batch_size,
                     "max_length": args.max_length, "rank": args.rank, "seed": args.seed, "limit": args.limit,
                     "lr_lora": get_method("lora").default_lr, "lr_full": get_method("full").default_lr},
        "tasks": [s.describe() for s in splits],
        "head_width": width,
        "lora_targets": adapted,
        "per_task_deltas": deltas.to_dict(),
        "sequential_full": full.to_dict(),
        "storage_bytes": {"base": base_bytes, "deltas": delta_bytes, "full": body_bytes + len(tasks) * head_bytes,
                          "full_per_task": len(tasks) * (body_bytes + head_bytes)},
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - began, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.out / "continual.json", json.dumps(record, indent=2) + "\n")
    text = report(record, deltas, full)
    write_text_atomic(args.out / "continual.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
