"""``deltatune demo``: the main job on the packaged MiniLM and movie reviews."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..train.job import TrainJob, run_train
from .compare import run_compare


#: LoRA on all four attention projections of each MiniLM layer: 0.65% of the parameters
LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]


def _demo(args: argparse.Namespace) -> int:
    out = Path(args.out)
    base = TrainJob(model="minilm", data="movie-reviews", steps=args.steps, batch_size=32, max_length=48,
                    eval_every=max(1, args.steps // 4), seed=args.seed)
    if args.compare:
        return run_compare(base, out, Path(args.results), targets=args.targets, keep=args.keep)
    print(f"1/2  frozen MiniLM + trained head only ({args.steps} steps)")
    head = run_train(dataclasses.replace(base, method="head", out=str(out / "head")))
    print(f"2/2  LoRA r=8 on the attention projections (query, key, value, output) + head ({args.steps} steps)")
    lora = run_train(dataclasses.replace(base, method="lora", targets=args.targets or LORA_TARGETS, out=str(out / "lora")))
    print()
    print(f"accuracy before (frozen base + trained head): {head['test']['accuracy']:.4f}")
    print(f"accuracy after  (LoRA delta + head):          {lora['test']['accuracy']:.4f}"
          f"   macro-F1 {lora['test']['macro_f1']:.4f}")
    print(f"trainable parameters: {lora['trainable_parameters']:,} of {lora['total_parameters']:,} "
          f"({lora['percent_trainable']:.2f}%)")
    print(f"delta file: {lora['delta_bytes'] / 1024:.0f} KiB   train time: {lora['train_seconds']:.0f} s   "
          f"peak memory: {lora['peak_memory_mb']:.0f} MiB")
    print(f"files: {out / 'lora'}/ (delta.safetensors, delta.json, metrics.json, config.yaml, loss.png)")
    return 0


def add_parsers(commands) -> None:
    demo = commands.add_parser("demo", help="LoRA on MiniLM + movie reviews, before and after (--compare: every method)")
    demo.add_argument("--compare", action="store_true", help="train every method on the same budget and compare")
    demo.add_argument("--steps", type=int, default=250, help="optimizer steps per method")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--targets", nargs="+", default=None)
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--results", default="results", help="where --compare writes compare.md and compare.png")
    demo.add_argument("--keep", action="store_true",
                      help="with --compare: reuse rows of compare.json trained on the same budget (train only new methods)")
    demo.set_defaults(run=_demo)
