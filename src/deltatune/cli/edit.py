"""``deltatune edit``: write a fact (ROME) or a file of facts (MEMIT) into a causal LM as a LoRA delta."""

from __future__ import annotations

import argparse

import deltatune as dt
from ..editing import EDITORS, KeyStatistics, load_facts, score_facts
from ..editing.stats import DEFAULT_CORPUS
from ..editing.value import EditSettings
from ..errors import ConfigError
from ..models.load import check_model_name, load_model


def _layers(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes block indices separated by commas (e.g. 4,5,6), got {text!r}") from None


def _facts(args: argparse.Namespace) -> list[dt.Fact]:
    single = [args.subject, args.prompt, args.target]
    if args.facts is not None:
        if any(v is not None for v in single):
            raise ConfigError("give either --facts FILE or --subject/--prompt/--target, not both")
        return load_facts(args.facts)
    if any(v is None for v in single):
        missing = [flag for flag, v in zip(("--subject", "--prompt", "--target"), single) if v is None]
        raise ConfigError(f"missing {', '.join(missing)}: an edit needs --subject, --prompt (a template with {{}} "
                          f"where the subject goes) and --target, or --facts FILE")
    return [dt.Fact(args.subject, args.prompt, args.target)]


def _edit(args: argparse.Namespace) -> int:
    facts = _facts(args)
    settings = EditSettings(steps=args.steps, lr=args.lr, min_probability=args.min_probability,
                            mom2_weight=args.mom2_weight)
    check_model_name(args.model)
    loaded = load_model(args.model, "causal_lm")
    model, tokenizer = loaded.model, loaded.tokenizer
    before = score_facts(model, tokenizer, facts)
    stats = KeyStatistics(tokens=args.stats_tokens, corpus=args.corpus)
    report = dt.edit(model, tokenizer, facts, method=args.method, layers=_layers(args.layers), name=args.name,
                     stats=stats, settings=settings)
    after = score_facts(model, tokenizer, facts)
    print(report)
    print(f"before: {before}")
    print(f"after:  {after}")
    dt.save(model, args.out, args.name, provenance={"model": args.model, **report.provenance()},
            metrics={"before": before.summary(), "after": after.summary()}, task="causal_lm")
    print(f"saved {args.method} edit {args.name!r} to {args.out}")
    return 0


def add_parsers(commands) -> None:
    edit = commands.add_parser("edit", help="edit facts in a causal LM (ROME / MEMIT), saved as a LoRA delta")
    edit.add_argument("--model", default="smollm2", help="smollm2 or a local transformers causal-LM folder")
    edit.add_argument("--subject", help="the subject whose fact changes (e.g. France)")
    edit.add_argument("--prompt", help="a template with {} where the subject goes (e.g. 'The capital of {} is')")
    edit.add_argument("--target", help="the new object (e.g. Rome)")
    edit.add_argument("--facts", metavar="FILE", help="a JSON list or JSON-lines file of {subject, prompt, target} "
                                                      "records (with --method memit)")
    edit.add_argument("--method", choices=sorted(EDITORS), default="rome",
                      help="rome: one fact, one layer; memit: a batch over several layers")
    edit.add_argument("--layers", help="block indices, comma-separated (default: ROME one block a fifth of the way "
                                       "in, MEMIT the five blocks ending there)")
    edit.add_argument("--out", required=True, metavar="DIR", help="the delta folder to write")
    edit.add_argument("--name", default="edit", help="the delta's name")
    edit.add_argument("--steps", type=int, default=EditSettings.steps, help="most steps of the value search")
    edit.add_argument("--lr", type=float, default=EditSettings.lr, help="learning rate of the value search")
    edit.add_argument("--min-probability", type=float, default=EditSettings.min_probability,
                      help="the value search fails (nothing written) if the new object's probability stays below this")
    edit.add_argument("--mom2-weight", type=float, default=EditSettings.mom2_weight,
                      help="MEMIT's λ: weight of the key statistics against the new keys")
    edit.add_argument("--stats-tokens", type=int, default=20000, help="corpus tokens for the key statistics (cached)")
    edit.add_argument("--corpus", default=DEFAULT_CORPUS, help="packaged dataset the key statistics are read from")
    edit.set_defaults(run=_edit)
