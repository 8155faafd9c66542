"""DiaBlo: a trainable change of the N diagonal blocks of each weight.

The reference writes ``D`` out densely: a zero ``(out, in)`` matrix with block ``k`` copied
into rows ``k*o:(k+1)*o`` and columns ``k*i:(k+1)*i``, then ``y = x (W + D)^T + b``.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import MODELS
from method_checks import (assert_a_mixed_batch_trains_every_routed_delta, assert_folded_linear_merge_weight,
                           assert_merge_adds_and_unmerge_restores, assert_output_adds, assert_refused_at_attach,
                           assert_rows_equal_alone, attach_randomised, attached_at, dense_changes_checked,
                           loaded_inactive, randomise as _randomise, saved_config, token_batch,
                           train_from_the_command_line)

import deltatune as dt
from deltatune.algebra import TaskVector, merge_deltas
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
    attached = attached_at(case_name, path, DiaBloConfig(num_blocks=4, targets=[f"re:{path}"]))
    unit, weight = attached.unit, attached.weight
    fan_out, fan_in = weight.shape
    dense = _dense_reference(unit.blocks.detach(), fan_in, fan_out)
    assert unit.blocks.shape == (4, fan_out // 4, fan_in // 4)
    x = torch.randn(2, 5, fan_in, generator=torch.Generator().manual_seed(3))
    assert_output_adds(attached, dense, x)
    with torch.no_grad():
        torch.testing.assert_close(unit.delta_weight(weight), dense)
    assert_merge_adds_and_unmerge_restores(attached, dense)


def test_a_new_delta_is_zero_and_counts_in_times_out_over_n():
    model = MODELS["llama"].build()
    report = dt.attach(model, DiaBloConfig(num_blocks=8, targets=["q_proj", "v_proj"]), name="x")
    assert report.trainable == 2 * (32 * 32 + 32 * 16) // 8
    assert all(torch.equal(p, torch.zeros_like(p)) for _, p in dt.delta_parameters(model, "x"))


def test_bad_num_blocks_is_refused_at_construction():
    with pytest.raises(dt.ConfigError, match="num_blocks"):
        DiaBloConfig(num_blocks=0)


def test_a_block_count_that_does_not_divide_a_width_is_refused_at_attach():
    # q_proj is 32 x 32, v_proj 32 -> 16: 32 blocks fit the first, not the second's 16 outputs
    assert_refused_at_attach("llama", DiaBloConfig(num_blocks=32, targets=["q_proj", "v_proj"]),
                             r"'model.layers.0.self_attn.v_proj' \(Linear, in=32, out=16\)", "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("case_name", ["llama", "gpt2"])
def test_mixed_batch_rows_equal_each_row_alone(case_name):
    case = MODELS[case_name]
    model = case.build()
    attach_randomised(model, {"d4": DiaBloConfig(num_blocks=4), "d8": DiaBloConfig(num_blocks=8),
                              "d4b": DiaBloConfig(num_blocks=4), "lora": dt.LoRAConfig(r=2)})
    rows = ["d4", None, "d8", "d4b", "lora", "d4", None, "d8"]
    assert_rows_equal_alone(case, model, rows, token_batch(len(rows), seed=2))
    assert dt.get_method("diablo").mixing.mode == "batched"


def test_ties_and_linear_merging_take_the_dense_block_diagonal_changes(tmp_path):
    case = MODELS["bert"]
    folders = []
    for seed, count in enumerate([4, 8]):
        model = case.build()
        dt.attach(model, DiaBloConfig(num_blocks=count, targets=["query"]), name=f"d{count}")
        _randomise(model, f"d{count}", seed + 1)
        folders.append(dt.save(model, tmp_path / f"d{count}"))
    sources = loaded_inactive(case, folders)
    path = "bert.encoder.layer.1.attention.self.query"
    module = sources.get_submodule(path)
    changes = dense_changes_checked(sources, ("d4", "d8"), path, lambda unit: _dense_reference(unit.blocks.detach(), 32, 32))
    assert_folded_linear_merge_weight(case, folders, [0.3, 0.7], path, module.weight + 0.3 * changes[0] + 0.7 * changes[1])
    ties = case.build()
    report = merge_deltas(ties, folders, "ties", density=0.5)
    assert report.result == "dense"
    # TIES keeps, per entry, only values agreeing with the elected sign: never outside both blocks' support
    change = dict(TaskVector.from_delta(ties, "merged").dense())[f"{path}.weight"]
    support = (changes[0] != 0) | (changes[1] != 0)
    assert torch.all(change[~support] == 0) and change.abs().sum() > 0


def test_diablo_trains_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "diablo", "--num-blocks", "4"])
    config = saved_config(out)
    assert config["method"] == "diablo" and config["num_blocks"] == 4


def test_diablo_has_no_peft_format():
    assert dt.get_method("diablo").peft is None and "diagonal" in dt.get_method("diablo").peft_refusal


def test_a_mixed_batch_trains_every_routed_delta():
    assert_a_mixed_batch_trains_every_routed_delta(DiaBloConfig(num_blocks=4))
