"""One measurement per call: ``python -m bench.workers <kind> '<json-args>'`` prints one JSON line.

Kinds: ``train_step`` (one library and method: median forward + backward + AdamW step, and
the process's peak RSS), ``equivalence`` (LoRA losses of deltatune vs peft from identical
weights), ``inference`` (unmerged / merged latency, merge / unmerge, save, file size, load).

Every worker builds its model from a fixed seed, so two workers with the same arguments
start from the same weights and see the same batches. ``"model": "tiny"`` swaps the packaged
MiniLM for a small random BERT (used by the tests).
"""

from __future__ import annotations

import copy
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LORA_TARGETS = ["query", "key", "value", "attention.output.dense"]
IA3_RE = r"(^|\.)layer\.\d+\.(attention\.self\.(key|value)|output\.dense)$"
IA3_FFN_RE = r"(^|\.)layer\.\d+\.output\.dense$"
R, ALPHA, TOKENS, LR = 8, 16, 20, 1e-3


def setup(threads: int = 2) -> None:
    torch.set_num_threads(threads)
    warnings.simplefilter("ignore")
    from transformers.utils import logging

    logging.set_verbosity_error()


def build_model(name: str, seed: int = 0):
    """The base model (sequence classification, 2 labels) with a seeded classifier head."""
    torch.manual_seed(seed)
    if name == "tiny":
        import transformers

        config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, max_position_embeddings=128, num_labels=2)
        return transformers.BertForSequenceClassification(config)
    from deltatune.models.load import load_model

    return load_model(name, "classification", 2).model


def make_batch(model, batch: int, seq: int, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return {"input_ids": torch.randint(0, vocab, (batch, seq), generator=generator),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=generator)}


def module_names(model, pattern: str) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and re.search(pattern, n)]


def attach(lib: str, method: str, model, inference: bool = False):
    """The model with the method attached by ``lib``; the classifier head trains in both
    libraries (peft's SEQ_CLS task puts it in modules_to_save, deltatune is told the same)."""
    if method in ("floor", "full"):
        for p in model.parameters():
            p.requires_grad_(method == "full")
        return model
    if lib == "deltatune":
        import deltatune as dt

        head = [] if inference else ["classifier"]
        if method in ("lora", "dora"):
            cls = dt.DoRAConfig if method == "dora" else dt.LoRAConfig
            config = cls(r=R, alpha=ALPHA, dropout=0.0, targets=LORA_TARGETS, modules_to_save=head)
            if inference:
                config = dt.LoRAConfig(r=R, alpha=ALPHA, target_types=["Linear"], exclude=["classifier", "pooler.dense"])
        elif method == "ia3":
            config = dt.IA3Config(targets=["re:" + IA3_RE.replace("(^|\\.)", ".*")],
                                  feedforward=["re:" + IA3_FFN_RE.replace("(^|\\.)", ".*")], modules_to_save=head)
        elif method == "prompt":
            config = dt.PromptConfig(num_virtual_tokens=TOKENS, modules_to_save=head)
        elif method == "prefix":
            config = dt.PrefixConfig(num_virtual_tokens=TOKENS, modules_to_save=head)
        else:
            raise ValueError(method)
        dt.attach(model, config, name="bench")
        return model
    import peft

    task = {} if inference else {"task_type": "SEQ_CLS"}
    if method in ("lora", "dora"):
        targets = module_names(model, r"encoder\.") if inference else LORA_TARGETS
        config = peft.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets,
                                 use_dora=method == "dora", **task)
    elif method == "ia3":
        config = peft.IA3Config(target_modules=module_names(model, IA3_RE),
                                feedforward_modules=module_names(model, IA3_FFN_RE), **task)
    elif method == "prompt":
        config = peft.PromptTuningConfig(num_virtual_tokens=TOKENS, **task)
    elif method == "prefix":
        config = peft.PrefixTuningConfig(num_virtual_tokens=TOKENS, prefix_projection=False, **task)
    else:
        raise ValueError(method)
    return peft.get_peft_model(model, config)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def summary(times: list[float]) -> dict:
    ms = sorted(t * 1000 for t in times)
    q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
    return {"median": statistics.median(ms), "min": ms[0], "q1": q[0], "q3": q[2], "n": len(ms)}


def train_step(args: dict) -> dict:
    """Median train step of one library and method (``floor``: all frozen, backward to the
    input embeddings; ``full``: every parameter trains)."""
    lib, method = args.get("lib", "deltatune"), args["method"]
    model = attach(lib, method, build_model(args.get("model", "minilm"), args.get("seed", 0)))
    model.train()
    batch = make_batch(model, args.get("batch", 32), args.get("seq", 64), args.get("seed", 0))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR) if params else None
    if method == "floor":
        with torch.no_grad():
            embeds0 = model.get_input_embeddings()(batch["input_ids"])
        inputs = {k: v for k, v in batch.items() if k != "input_ids"}

    def step() -> float:
        if method == "floor":
            embeds = embeds0.detach().requires_grad_(True)
            loss = model(inputs_embeds=embeds, **inputs).loss
            loss.backward()
            assert embeds.grad is not None
        else:
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(args.get("warmup", 3)):
        step()
    times = []
    for _ in range(args.get("repeats", 20)):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"kind": "train_step", "lib": lib, "method": method, "step_ms": summary(times),
            "trainable": sum(p.numel() for p in params), "peak_rss_mib": peak_rss_mib(),
            "threads": torch.get_num_threads()}


def _train_losses(model, steps: int, batches: list[dict]) -> list[float]:
    model.eval()  # dropout 0 everywhere: the losses are deterministic
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    losses = []
    for i in range(steps):
        loss = model(**batches[i % len(batches)]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def equivalence(args: dict) -> dict:
    """LoRA: deltatune's initial A/B copied into peft's parameters; the first ``steps`` losses."""
    import deltatune as dt

    name, steps, seed = args.get("model", "minilm"), args.get("steps", 50), args.get("seed", 0)
    mine = attach("deltatune", "lora", build_model(name, seed))
    batches = [make_batch(mine, args.get("batch", 32), args.get("seq", 64), seed + i) for i in range(5)]
    initial = {n: p.detach().clone() for n, p in dt.delta_parameters(mine, "bench")}
    theirs = attach("peft", "lora", build_model(name, seed))
    copied = 0
    with torch.no_grad():
        for pname, param in theirs.named_parameters():
            match = re.match(r"^base_model\.model\.(.+)\.lora_(A|B)\.default\.weight$", pname)
            if match:
                param.copy_(initial[f"{match[1]}.lora_{match[2]}"])
                copied += 1
    lora_tensors = sum(1 for n in initial if ".lora_" in n)
    if copied != lora_tensors:
        raise RuntimeError(f"copied {copied} LoRA tensors into peft, deltatune has {lora_tensors}")
    ours = _train_losses(mine, steps, batches)
    peft_losses = _train_losses(theirs, steps, batches)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours, peft_losses)]
    return {"kind": "equivalence", "steps": steps, "copied_tensors": copied, "max_rel_diff": max(rel),
            "deltatune_losses": ours, "peft_losses": peft_losses}


def _latency(model, batch: dict, repeats: int, warmup: int) -> dict:
    times = []
    with torch.no_grad():
        for i in range(warmup + repeats):
            start = time.perf_counter()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return summary(times)


def _timed(fn, repeats: int) -> dict:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return summary(times)


def inference(args: dict) -> dict:
    """LoRA r=8 on every encoder Linear: latency unmerged and merged, merge / unmerge, save, load."""
    lib, name, seed = args.get("lib", "deltatune"), args.get("model", "minilm"), args.get("seed", 0)
    repeats, warmup = args.get("repeats", 20), args.get("warmup", 3)
    base = build_model(name, seed).eval()
    model = attach(lib, "lora", copy.deepcopy(base), inference=True).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # a non-zero B, as after training
        for pname, p in model.named_parameters():
            if "lora_B" in pname:
                p.copy_(0.01 * torch.randn(p.shape, generator=generator))
    adapted = sum(1 for pname, _ in model.named_parameters() if "lora_A" in pname)
    out: dict = {"kind": "inference", "lib": lib, "adapted_modules": adapted}
    batches = {b: make_batch(model, b, args.get("seq", 64), seed) for b in (1, 32)}
    if lib == "deltatune":
        import deltatune as dt

        merge, unmerge = (lambda: dt.merge(model)), (lambda: dt.unmerge(model))
    else:
        merge, unmerge = model.merge_adapter, model.unmerge_adapter
    for b, batch in batches.items():
        out[f"unmerged_b{b}"] = _latency(model, batch, repeats, warmup)
    merge_t, unmerge_t = [], []
    for _ in range(args.get("merge_repeats", 10)):
        start = time.perf_counter(); merge(); merge_t.append(time.perf_counter() - start)
        start = time.perf_counter(); unmerge(); unmerge_t.append(time.perf_counter() - start)
    out["merge"], out["unmerge"] = summary(merge_t), summary(unmerge_t)
    merge()
    for b, batch in batches.items():
        out[f"merged_b{b}"] = _latency(model, batch, repeats, warmup)
    unmerge()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "delta"
        if lib == "deltatune":
            out["save"] = _timed(lambda: dt.save(model, folder), 3)
            files = [folder / "delta.safetensors", folder / "delta.json"]

            def load():
                dt.load(copy.deepcopy(base), folder)
        else:
            import peft

            out["save"] = _timed(lambda: model.save_pretrained(folder), 3)
            files = [folder / "adapter_model.safetensors", folder / "adapter_config.json"]

            def load():
                peft.PeftModel.from_pretrained(copy.deepcopy(base), folder)
        out["file_bytes"] = sum(f.stat().st_size for f in files)
        out["tensor_file_bytes"] = files[0].stat().st_size
        copy_t = _timed(lambda: copy.deepcopy(base), 5)["median"]  # subtracted: the base copy is not the load
        load_s = _timed(load, args.get("load_repeats", 5))
        out["load"] = {k: (v - copy_t if k in ("median", "min", "q1", "q3") else v) for k, v in load_s.items()}
    out["peak_rss_mib"] = peak_rss_mib()
    return out


KINDS = {"train_step": train_step, "equivalence": equivalence, "inference": inference}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in KINDS:
        raise SystemExit(f"usage: python -m bench.workers {{{'|'.join(KINDS)}}} '<json-args>'")
    args = json.loads(argv[1])
    setup(args.get("threads", 2))
    print(json.dumps(KINDS[argv[0]](args)), flush=True)


if __name__ == "__main__":
    main()
