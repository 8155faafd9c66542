"""``deltatune generate``: a causal LM's answers with and without a trained delta, side by side."""

from __future__ import annotations

import argparse

import deltatune as dt
from ..errors import DeltaError
from ..models.generate import generate_text
from ..core.quantized import FORMATS
from ..models.load import check_model_name, load_model


def _generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise DeltaError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise DeltaError(f"--temperature must be 0 (greedy) or positive, got {args.temperature}")
    check_model_name(args.model)
    loaded = load_model(args.model, "causal_lm", quantize=args.quantize)
    model, tokenizer = loaded.model, loaded.tokenizer
    report = dt.load(model, args.delta)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    decoding = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}, seed {args.seed}"
    print(f"model: {args.model}   delta: {args.delta} ({report.method})   decoding: {decoding}, at most {args.max_new_tokens} new tokens")
    for prompt in args.prompt:
        with dt.base_only(model):
            base = generate_text(model, tokenizer, prompt, **options)
        tuned = generate_text(model, tokenizer, prompt, **options)
        print()
        print(f"prompt: {prompt}")
        print(f"  base:  {base}")
        print(f"  tuned: {tuned}")
    return 0


def add_parsers(commands) -> None:
    generate = commands.add_parser("generate", help="answer prompts with the base causal LM and with a delta, side by side")
    generate.add_argument("--model", default="smollm2", help="smollm2 or a local transformers folder (the delta's base)")
    generate.add_argument("--delta", required=True, metavar="DIR", help="a delta folder (a train --out folder)")
    generate.add_argument("--prompt", action="append", required=True, help="a question to answer (repeat for several)")
    generate.add_argument("--max-new-tokens", type=int, default=48, help="longest answer, in tokens")
    generate.add_argument("--temperature", type=float, default=0.0, help="0: greedy decoding; above 0: sampling")
    generate.add_argument("--seed", type=int, default=0, help="seed for sampling")
    generate.add_argument("--quantize", choices=FORMATS, default=None,
                          help="quantise the frozen base's Linear layers (int8, or 4bit NF4)")
    generate.set_defaults(run=_generate)
