"""DiaBlo: a trainable change of the N diagonal blocks of each weight.

The reference writes ``D`` out densely: a zero ``(out, in)`` matrix with block ``k`` copied
into rows ``k*o:(k+1)*o`` and columns ``k*i:(k+1)*i``, then ``y = x (W + D)^T + b``.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny_models import MODELS
from method_checks import assert_rows_equal_alone, randomise as _randomise

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
from deltatune.cli import main
from deltatune.methods.diablo import DiaBloConfig


def _dense_reference(blocks: torch.Tensor, fan_in: int, fan_out: int) -> torch.Tensor:
    count, o, i = blocks.shape
    dense = torch.zeros(fan_out, fan_in)
    for k in range(count):
        dense[k * o:(k + 1) * o, k * i:(k + 1) * i] = blocks[k]
    return dense


@pytest.mark.parametrize("case_name,path", [("llama", "model.layers.0.self_attn.v_proj"),  # Linear 32 -> 16
                                            ("gpt2", "transformer.h.0.attn.c_attn")])  # Conv1D 32 -> 96
def test_output_and_merge_add_the_block_diagonal_change(case_name, path):
    case = MODELS[case_name]
    model = case.build()
    dt.attach(model, DiaBloConfig(num_blocks=4, targets=[f"re:{path}"]), name="x")
    _randomise(model, "x", 1)
    module = model.get_submodule(path)
    unit = module.deltas["x"]
    transposed = case_name == "gpt2"
    weight = (module.weight.T if transposed else module.weight).detach().clone()
    fan_out, fan_in = weight.shape
    dense = _dense_reference(unit.blocks.detach(), fan_in, fan_out)
    assert unit.blocks.shape == (4, fan_out // 4, fan_in // 4)
    x = torch.randn(2, 5, fan_in, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(module(x), F.linear(x, weight + dense, module.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(unit.delta_weight(weight), dense)
    original = module.weight.detach().clone()
    dt.merge(model)
    torch.testing.assert_close(module.weight.detach(), (weight + dense).T if transposed else weight + dense)
    dt.unmerge(model)
    assert torch.equal(module.weight, original)


def test_a_new_delta_is_zero_and_counts_in_times_out_over_n():
    model = MODELS["llama"].build()
    report = dt.attach(model, DiaBloConfig(num_blocks=8, targets=["q_proj", "v_proj"]), name="x")
    assert report.trainable == 2 * (32 * 32 + 32 * 16) // 8
    assert all(torch.equal(p, torch.zeros_like(p)) for _, p in dt.delta_parameters(model, "x"))


def test_bad_num_blocks_is_refused_at_construction():
    with pytest.raises(dt.ConfigError, match="num_blocks"):
        DiaBloConfig(num_blocks=0)


def test_a_block_count_that_does_not_divide_a_width_is_refused_at_attach():
    model = MODELS["llama"].build()
    # q_proj is 32 x 32, v_proj 32 -> 16: 32 blocks fit the first, not the second's 16 outputs
    with pytest.raises(dt.NotApplicableError, match=r"'model.layers.0.self_attn.v_proj' \(Linear, in=32, out=16\)"):
        dt.attach(model, DiaBloConfig(num_blocks=32, targets=["q_proj", "v_proj"]), name="x")
    assert dt.list_deltas(model) == [] and not hasattr(model.get_submodule("model.layers.0.self_attn.q_proj"), "deltas")


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_row_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    configs = {"d4": DiaBloConfig(num_blocks=4), "d8": DiaBloConfig(num_blocks=8), "d4b": DiaBloConfig(num_blocks=4),
               "lora": dt.LoRAConfig(r=2)}
    for seed, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        _randomise(model, name, seed + 1)
    rows = ["d4", None, "d8", "d4b", "lora", "d4", None, "d8"]
    inputs = {"input_ids": torch.randint(1, 100, (len(rows), 6), generator=torch.Generator().manual_seed(2))}
    assert_rows_equal_alone(case, model, rows, inputs)
    assert dt.get_method("diablo").mixing.mode == "batched"


def test_ties_and_linear_merging_take_the_dense_block_diagonal_changes(tmp_path):
    case = MODELS["bert"]
    folders = []
    for seed, count in enumerate([4, 8]):
        model = case.build()
        dt.attach(model, DiaBloConfig(num_blocks=count, targets=["query"]), name=f"d{count}")
        _randomise(model, f"d{count}", seed + 1)
        folders.append(dt.save(model, tmp_path / f"d{count}"))
    sources = case.build()
    for folder in folders:
        dt.load(sources, folder, activate=False)
    path = "bert.encoder.layer.1.attention.self.query"
    module = sources.get_submodule(path)
    changes = []
    for name in ("d4", "d8"):
        dense = _dense_reference(module.deltas[name].blocks.detach(), 32, 32)
        torch.testing.assert_close(TaskVector.from_delta(sources, name).dense()[f"{path}.weight"], dense)
        changes.append(dense)
    merged = case.build()
    merge_deltas(merged, folders, "linear", [0.3, 0.7])
    dt.fold(merged)
    torch.testing.assert_close(merged.get_submodule(path).weight, module.weight + 0.3 * changes[0] + 0.7 * changes[1],
                               rtol=1e-5, atol=1e-6)
    ties = case.build()
    report = merge_deltas(ties, folders, "ties", density=0.5)
    assert report.result == "dense"
    # TIES keeps, per entry, only values agreeing with the elected sign: never outside both blocks' support
    change = dict(TaskVector.from_delta(ties, "merged").dense())[f"{path}.weight"]
    support = (changes[0] != 0) | (changes[1] != 0)
    assert torch.all(change[~support] == 0) and change.abs().sum() > 0


def test_diablo_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    args = ["train", "--model", str(tiny_bert), "--data", str(reviews_csv), "--text-column", "review",
            "--label-column", "sentiment", "--steps", "6", "--batch-size", "8", "--max-length", "16", "--no-progress",
            "--method", "diablo", "--num-blocks", "4", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    saved = json.loads((tmp_path / "run" / "delta.json").read_text())
    assert saved["config"]["method"] == "diablo" and saved["config"]["num_blocks"] == 4


def test_diablo_has_no_peft_format():
    assert dt.get_method("diablo").peft is None and "diagonal" in dt.get_method("diablo").peft_refusal


def test_a_mixed_batch_trains_every_routed_delta():
    case = MODELS["bert"]
    model = case.build()
    for name in ("a", "b"):
        dt.attach(model, DiaBloConfig(num_blocks=4), name=name)
        _randomise(model, name, ord(name))
    with dt.route(model, ["a", "b", None]):
        case.output(model, {"input_ids": torch.randint(1, 100, (3, 5))}).sum().backward()
    for name in ("a", "b"):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in dt.delta_parameters(model, name))
