"""Checks shared by the method test files (tests/test_method_<name>.py)."""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from tiny_models import MODELS

import deltatune as dt


def randomise(model, name: str, seed: int = 3, scale: float = 0.3) -> None:
    """Move every tensor of delta ``name`` by ``scale`` N(0, 1), seeded, away from its start."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def assert_rows_equal_alone(case, model, rows: list, inputs: dict, tol: float = 1e-5) -> None:
    """One mixed batch routed by ``rows`` (delta names, ``None`` for the base) gives, row by
    row, what that row gives run alone with only its delta active."""
    with torch.no_grad(), dt.route(model, rows):
        mixed = case.output(model, inputs)
    with torch.no_grad():
        for i, name in enumerate(rows):
            with dt.using(model, (name,) if name else ()):
                alone = case.output(model, {k: v[i:i + 1] for k, v in inputs.items()})[0]
            torch.testing.assert_close(mixed[i], alone, rtol=tol, atol=tol, msg=lambda m, i=i: f"row {i}: {m}")


def delta_tensors(model, name: str) -> dict:
    """Every tensor delta ``name`` holds (trained parameters and frozen buffers), by portable name."""
    from deltatune.core.slot import slot_sites

    out = {}
    for path, _, slot in slot_sites(model):
        if name in slot:
            out.update({f"{path}.{k}" if path else k: t for k, t in slot[name].saved_tensors().items()})
    return out


def token_batch(rows: int, seed: int, attention_mask: bool = False) -> dict:
    """``rows`` random sequences of 6 token ids in [1, 100), seeded; with ``attention_mask``, a mask of ones."""
    ids = torch.randint(1, 100, (rows, 6), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if attention_mask else {"input_ids": ids}


def attach_randomised(model, configs: dict) -> None:
    """Attach each of ``configs`` (delta name -> config) under its name, the i-th randomised with seed i + 1."""
    for seed, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        randomise(model, name, seed + 1)


def padded_token_batch(rows: int, seed: int = 7) -> dict:
    """``rows`` random sequences of 6 token ids in [1, 100), seeded, the first row's last two masked out."""
    ids = torch.randint(1, 100, (rows, 6), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def assert_each_row_equals_it_alone(case, model, rows: list, inputs: dict, mixed: torch.Tensor,
                                    tol: float = 1e-5) -> None:
    """Row ``i`` of ``mixed`` (one batch routed by ``rows``) equals row ``i`` of ``inputs`` run alone
    with only delta ``rows[i]`` active (``None``: under ``dt.base_only``)."""
    for row, name in enumerate(rows):
        one = {k: v[row:row + 1] for k, v in inputs.items()}
        with torch.no_grad(), (dt.base_only(model) if name is None else dt.using(model, name)):
            alone = case.output(model, one)[0]
        torch.testing.assert_close(mixed[row], alone, rtol=tol, atol=tol)


def assert_a_mixed_batch_trains_every_routed_delta(config) -> None:
    """Two deltas of ``config`` on the tiny BERT, rows routed to each and to the base: one backward
    pass gives every parameter of both deltas a non-zero gradient."""
    case = MODELS["bert"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, config, name=name)
        randomise(model, name, ord(name))
    with dt.route(model, ["a", "b", None]):
        case.output(model, {"input_ids": torch.randint(1, 100, (3, 5))}).sum().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.delta_parameters(model, name))


@dataclass
class AttachedModule:
    """A model with a delta at one module: the module, its unit, its weight as ``(out, in)`` (a
    copy taken before any merge) and whether the module stores it ``(in, out)`` (GPT-2's Conv1D)."""

    model: nn.Module
    module: nn.Module
    unit: nn.Module
    weight: torch.Tensor
    transposed: bool


def attached_at(case_name: str, path: str, config, name: str = "x") -> AttachedModule:
    """A fresh ``case_name`` model with ``config`` (targeting ``path``) attached as ``name`` and randomised (seed 1)."""
    model = MODELS[case_name].build()
    dt.attach(model, config, name=name)
    randomise(model, name, 1)
    module = model.get_submodule(path)
    transposed = case_name == "gpt2"  # GPT-2's Conv1D stores (in, out)
    weight = (module.weight.T if transposed else module.weight).detach().clone()
    return AttachedModule(model, module, module.deltas[name], weight, transposed)


def assert_output_adds(attached: AttachedModule, change: torch.Tensor, x: torch.Tensor) -> None:
    """The module's output on ``x`` is ``x (W + change)^T + b``, ``change`` a dense ``(out, in)`` matrix."""
    module, weight = attached.module, attached.weight
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, weight + change, module.bias), rtol=1e-5, atol=1e-5)


def assert_merge_adds_and_unmerge_restores(attached: AttachedModule, change: torch.Tensor) -> None:
    """``dt.merge`` writes ``W + change`` into the module's weight (in its stored layout);
    ``dt.unmerge`` gives back the original weight exactly."""
    module, weight, transposed = attached.module, attached.weight, attached.transposed
    original = module.weight.detach().clone()
    dt.merge(attached.model)
    torch.testing.assert_close(module.weight.detach(), (weight + change).T if transposed else weight + change)
    dt.unmerge(attached.model)
    assert torch.equal(module.weight, original)


def assert_refused_at_attach(case_name: str, config, match: str, untouched: str) -> None:
    """Attaching ``config`` to a fresh ``case_name`` model raises NotApplicableError matching
    ``match`` and leaves no delta, not even at ``untouched``, a module the config also targets."""
    model = MODELS[case_name].build()
    with pytest.raises(dt.NotApplicableError, match=match):
        dt.attach(model, config, name="x")
    assert dt.list_deltas(model) == [] and not hasattr(model.get_submodule(untouched), "deltas")


def assert_target_refused_at_attach(model, config, match: str, name: str = "default") -> None:
    """Attaching ``config`` to ``model`` raises TargetError matching ``match`` and leaves no delta
    and no ``deltas`` child on the model."""
    with pytest.raises(dt.TargetError, match=match):
        dt.attach(model, config, name=name)
    assert not dt.list_deltas(model) and not hasattr(model, "deltas")


def loaded_inactive(case, folders: list) -> nn.Module:
    """A fresh ``case`` base with the delta of each of ``folders`` loaded, none active."""
    model = case.build()
    for folder in folders:
        dt.load(model, folder, activate=False)
    return model


def dense_changes_checked(sources, names, path: str, dense_reference) -> list:
    """For each delta of ``names`` in ``sources``: its task vector's change to the weight at ``path``
    equals ``dense_reference(unit)``; returns those dense changes, in order."""
    module = sources.get_submodule(path)
    changes = []
    for name in names:
        dense = dense_reference(module.deltas[name])
        torch.testing.assert_close(dt.TaskVector.from_delta(sources, name).dense()[f"{path}.weight"], dense)
        changes.append(dense)
    return changes


def assert_folded_linear_merge_weight(case, folders: list, weights: list, path: str, expected: torch.Tensor) -> None:
    """The ``"linear"`` merge of ``folders`` with ``weights``, folded into a fresh ``case`` base,
    leaves ``expected`` as the weight of the module at ``path``."""
    merged = case.build()
    dt.merge_deltas(merged, folders, "linear", weights)
    dt.fold(merged)
    torch.testing.assert_close(merged.get_submodule(path).weight, expected, rtol=1e-5, atol=1e-6)


def assert_linear_merge_equals_dense_reference(case, folders: list, weights: list, changes: dict) -> None:
    """The ``"linear"`` merge of ``folders`` with ``weights`` on a fresh ``case`` base gives the
    outputs of a base whose weights have ``changes`` (module path -> dense change) added by hand."""
    merged = case.build()
    dt.merge_deltas(merged, folders, "linear", weights)
    reference = case.build()
    with torch.no_grad():
        for path, change in changes.items():
            reference.get_submodule(path).weight.add_(change)
    torch.testing.assert_close(case.output(merged), case.output(reference), rtol=1e-5, atol=1e-5)


def save_each_alone(case, model, names, folder: Path) -> dict:
    """Run each delta of ``names`` alone on ``case``'s inputs and save it to ``folder / name``;
    returns the outputs by name."""
    outputs = {}
    for name in names:
        with dt.using(model, name):
            outputs[name] = case.output(model)
        dt.save(model, folder / name, name=name)
    return outputs


def assert_each_reloads_with_its_output(case, folder: Path, outputs: dict) -> None:
    """A fresh ``case`` base with every delta of ``outputs`` loaded (inactive) from ``folder / name``
    gives, with each active alone, exactly its output."""
    fresh = case.build()
    for name in outputs:
        dt.load(fresh, folder / name, activate=False)
    for name in outputs:
        with dt.using(fresh, name):
            torch.testing.assert_close(case.output(fresh), outputs[name], rtol=0, atol=0)


def encoded_examples(folder: Path, rows: int):
    """``rows`` encoded classification examples (6 words, labels a/b/c in turn, length 10) with a
    95-word BERT vocabulary written to ``folder``."""
    import transformers

    from deltatune.data.datasets import Example
    from deltatune.train.batches import encode

    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *[f"w{i}" for i in range(95)]]))
    tokenizer = transformers.BertTokenizer(str(vocab))
    return encode([Example(" ".join(f"w{(i * 7 + j) % 95}" for j in range(6)), "abc"[i % 3]) for i in range(rows)],
                  tokenizer, "classification", 10, ["a", "b", "c"])


def interrupt_after_step(monkeypatch, step: int, run, folder: Path) -> None:
    """``run(folder)`` with the training loop stopped by a KeyboardInterrupt right after ``step``
    (the interrupt is expected); the loop is restored afterwards."""
    from deltatune.train import loop

    real_after_step = loop.after_step

    def stop_after(model, at, total):
        real_after_step(model, at, total)
        if at == step:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "after_step", stop_after)
    with pytest.raises(KeyboardInterrupt):
        run(folder)
    monkeypatch.setattr(loop, "after_step", real_after_step)


def train_from_the_command_line(tmp_path: Path, model: Path, data: Path, method_flags: list, steps: int = 6) -> Path:
    """``deltatune train`` on ``model`` and the reviews CSV (``review`` -> ``sentiment``) with
    ``method_flags``; asserts it exits 0 and returns its out folder, ``tmp_path / "run"``."""
    from deltatune.cli import main

    out = tmp_path / "run"
    assert main(["train", "--model", str(model), "--data", str(data), "--text-column", "review",
                 "--label-column", "sentiment", "--steps", str(steps), "--batch-size", "8", "--max-length", "16",
                 "--no-progress", *method_flags, "--out", str(out)]) == 0
    return out


def saved_config(folder: Path) -> dict:
    """The ``config`` recorded in ``folder``'s ``delta.json``."""
    return json.loads((folder / "delta.json").read_text())["config"]


def assert_merging_is_refused_as_not_a_weight_change(tmp_path: Path, model, method: str, fresh_base) -> None:
    """A delta (``"x"`` on ``model``) that is not a weight change: merge, a task vector and
    ``merge_deltas`` of two saved copies onto ``fresh_base`` each refuse it by its method's name."""
    import deltatune as dt

    reason = dt.get_method(method).merge_refusal
    assert reason, f"{method} is not mergeable but declares no merge_refusal saying why"
    with pytest.raises(dt.MergeError, match=rf"{method}\) changes activations, not weights \({re.escape(reason)}\)"):
        dt.merge(model)
    with pytest.raises(dt.MergeError, match=method):
        dt.TaskVector.from_delta(model, "x")
    dt.save(model, tmp_path / "a")
    with pytest.raises(dt.MergeError, match=method):
        dt.merge_deltas(fresh_base, [tmp_path / "a", tmp_path / "a"], "linear", [0.5, 0.5])


def assert_peft_export_is_refused(tmp_path: Path, model, match: str) -> None:
    """Saving ``model``'s delta in peft's format raises a ConfigError matching ``match``."""
    from deltatune.interop import save_peft

    with pytest.raises(dt.ConfigError, match=match):
        save_peft(model, tmp_path / "peft")


def assert_conv1d_export_is_refused(tmp_path: Path, config, match: str, name: str = "x") -> None:
    """A delta of ``config`` on the tiny GPT-2 (Conv1D layers), saved, is refused by ``export_peft``
    with a ConfigError matching ``match``."""
    from deltatune.interop import export_peft

    model = MODELS["gpt2"].build()
    dt.attach(model, config, name=name)
    dt.save(model, tmp_path / "delta")
    with pytest.raises(dt.ConfigError, match=match):
        export_peft(tmp_path / "delta", tmp_path / "peft", MODELS["gpt2"].build())


# ---------------------------------------------------------------------------------------------
# peft


def quiet(function, *args, **kwargs):
    """``function(*args, **kwargs)`` with its warnings silenced (peft warns on the tiny models)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def logits(model, inputs: dict) -> torch.Tensor:
    """The model's logits on ``inputs``, without gradients."""
    with torch.no_grad():
        return model(**inputs).logits


def last_hidden_states(model, inputs: dict) -> torch.Tensor:
    """The last hidden states (tiny BERT's logits are ~0.01; its hidden states are O(1))."""
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states[-1]


def saved_peft_adapter(folder: Path, base, peft_config, seed: int, scale: float):
    """peft's own adapter of ``peft_config`` on ``base``, its trainable tensors moved by ``scale``
    N(0, 1) (seeded), saved by peft to ``folder``; returns the peft model in eval mode."""
    import peft

    theirs = quiet(peft.get_peft_model, base, peft_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in theirs.parameters() if p.requires_grad):
            param.add_(scale * torch.randn(param.shape, generator=generator))
    quiet(theirs.save_pretrained, folder)
    return theirs


def edit_adapter_config(folder: Path, **fields) -> None:
    """Add (or overwrite) ``fields`` in the ``adapter_config.json`` peft saved to ``folder``."""
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
