"""Mixture of LoRA experts (MoLA arXiv:2402.08562, SiRA arXiv:2311.09179): top-k routing and the
combined output against a hand-computed case and a per-token loop, the balancing loss by hand,
SiRA's capacity limit against a naive queue, MoLA's experts by depth, bad configs, mixed
batches, the merge refusal, the loss term in the training history and the router statistics
in metrics.json after ``deltatune train --method molora``."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from tiny_models import MODELS
from method_checks import (assert_a_mixed_batch_trains_every_routed_delta, assert_each_row_equals_it_alone,
                           assert_peft_export_is_refused, assert_target_refused_at_attach, encoded_examples,
                           padded_token_batch, randomise, train_from_the_command_line)

import deltatune as dt
from deltatune.core.inject import loss_terms
from deltatune.methods.molora import MoLoRAConfig, MoLoRALinear, units_of
from deltatune.methods.molora.layer import balancing_loss, capacity_keep, top_k_routing

BERT, GPT2, T5 = MODELS["bert"], MODELS["gpt2"], MODELS["t5"]
E = math.e


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _hand_model(**fields):
    """``proj``: W = [[1, 2], [3, 4]], b = [0.5, -0.5]; three rank-1 experts, s = alpha / r = 1:
    router rows R = [2, 0], [1, 1], [0, 3]; A_0 = [1, 0], A_1 = [0, 1], A_2 = [1, 1];
    B_0 = [1, 0]^T, B_1 = [0, 1]^T, B_2 = [1, 1]^T."""
    model = OneLinear()
    dt.attach(model, MoLoRAConfig(r=1, alpha=1.0, num_experts=3, top_k=2, targets=["proj"], **fields), name="x")
    unit = model.proj.deltas["x"]
    with torch.no_grad():
        model.proj.weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        model.proj.bias.copy_(torch.tensor([0.5, -0.5]))
        unit.router.copy_(torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 3.0]]))
        unit.lora_A.copy_(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]], [[1.0, 1.0]]]))
        unit.lora_B.copy_(torch.tensor([[[1.0], [0.0]], [[0.0], [1.0]], [[1.0], [1.0]]]))
    return model, unit


def _naive_update(x, unit, keep=None):
    """``s * sum over each token's top-k experts of g_e B_e A_e x``, token by token, expert by expert."""
    router, A, B = unit.router.detach(), unit.lora_A.detach(), unit.lora_B.detach()
    out = torch.zeros(x.shape[0], B.shape[1])
    for t in range(x.shape[0]):
        p = torch.softmax(router @ x[t], dim=0)
        chosen = sorted(range(len(p)), key=lambda e: -float(p[e]))[:unit.top_k]
        total = sum(float(p[e]) for e in chosen)
        for slot, e in enumerate(chosen):
            if keep is None or keep[t][slot]:
                out[t] += float(p[e]) / total * unit.scaling * (B[e] @ (A[e] @ x[t]))
    return out


def _naive_keep(chosen, num_experts, capacity_factor):
    """A queue per expert, first choices first, tokens in order; an expert takes ``ceil(c T k / E)``."""
    tokens, top_k = chosen.shape
    capacity = math.ceil(capacity_factor * tokens * top_k / num_experts)
    taken, keep = [0] * num_experts, [[False] * top_k for _ in range(tokens)]
    for slot in range(top_k):
        for t in range(tokens):
            e = int(chosen[t, slot])
            if taken[e] < capacity:
                keep[t][slot] = True
            taken[e] += 1
    return keep


def _module_update(model, module, x):
    with torch.no_grad():
        with dt.base_only(model):
            base = module(x)
        return module(x) - base


# ---------------------------------------------------------------------------------------------
# the maths


def test_top_k_routing_and_output_equal_the_hand_computed_case():
    model, unit = _hand_model()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # token 1: logits [2, 1, 0] -> experts 0, 1 with gates e/(e+1), 1/(e+1); A_0 x = 1, A_1 x = 0
    # token 2: logits [0, 1, 3] -> experts 2, 1 with gates e^2/(e^2+1), 1/(e^2+1); A_2 x = 1, A_1 x = 1
    _, chosen, gates = top_k_routing(torch.nn.functional.linear(x, unit.router.detach()), 2)
    assert chosen.tolist() == [[0, 1], [2, 1]]
    g1, g2 = E / (E + 1), E ** 2 / (E ** 2 + 1)
    torch.testing.assert_close(gates, torch.tensor([[g1, 1 - g1], [g2, 1 - g2]]))
    update = torch.tensor([[g1, 0.0], [g2, g2 + (1 - g2)]])  # g1 B_0; g2 B_2 + (1 - g2) B_1
    base = torch.tensor([[1.5, 2.5], [2.5, 3.5]])  # W x + b
    with torch.no_grad():
        torch.testing.assert_close(model(x), base + update)


@pytest.mark.parametrize("case,path", [(BERT, "bert.encoder.layer.1.attention.self.query"),
                                       (GPT2, "transformer.h.0.attn.c_attn")], ids=["linear", "conv1d"])
def test_output_equals_a_per_token_loop_with_four_experts_top_two(case, path):
    model = case.build()
    dt.attach(model, MoLoRAConfig(r=3, alpha=6.0, num_experts=4, top_k=2, targets=[path]), name="x")
    randomise(model, "x", 1)
    module = model.get_submodule(path)
    unit = module.deltas["x"]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0))
    expected = _naive_update(x.reshape(10, 32), unit).view(2, 5, -1)
    torch.testing.assert_close(_module_update(model, module, x), expected, rtol=1e-5, atol=1e-5)


def test_balancing_loss_equals_the_hand_computation():
    model, unit = _hand_model(aux_loss_coef=0.5)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p1 = [E ** 2, E, 1.0]
    p1 = [v / sum(p1) for v in p1]
    p2 = [1.0, E, E ** 3]
    p2 = [v / sum(p2) for v in p2]
    mean_p = [(a + b) / 2 for a, b in zip(p1, p2)]
    share = [1 / 4, 2 / 4, 1 / 4]  # chosen pairs: (0, 1), (2, 1)
    expected = 3 * sum(f * p for f, p in zip(share, mean_p))
    probs, chosen, _ = top_k_routing(torch.nn.functional.linear(x, unit.router.detach()), 2)
    assert balancing_loss(probs, chosen, 3).item() == pytest.approx(expected, rel=1e-6)
    model.train()
    model(x)
    assert loss_terms(model).item() == pytest.approx(0.5 * expected, rel=1e-6)
    assert loss_terms(model) is None  # each forward pass's term is taken once
    model.eval()
    model(x)
    assert loss_terms(model) is None  # no term outside training


def test_the_balancing_loss_alone_trains_the_router():
    model = BERT.build()
    dt.attach(model, MoLoRAConfig(r=2, targets=["query", "value"]), name="x")
    model.train()
    BERT.output(model)
    loss_terms(model).backward()
    for _, unit in units_of(model, "x"):
        assert unit.router.grad.abs().sum() > 0  # B is zero: only the balancing loss reaches the router


def test_capacity_keeps_what_a_naive_queue_keeps():
    generator = torch.Generator().manual_seed(0)
    for tokens, top_k, experts, factor in [(10, 2, 4, 0.5), (7, 1, 3, 1.0), (12, 3, 4, 0.75), (9, 2, 3, 2.0)]:
        chosen = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
        assert capacity_keep(chosen, experts, factor).tolist() == _naive_keep(chosen, experts, factor)


def test_output_with_a_capacity_limit_equals_the_loop_with_overflow_dropped():
    path = "bert.encoder.layer.0.attention.self.value"
    model = BERT.build()
    dt.attach(model, MoLoRAConfig(r=2, num_experts=4, top_k=2, capacity_factor=0.6, targets=[path]), name="x")
    randomise(model, "x", 2)
    module = model.get_submodule(path)
    unit = module.deltas["x"]
    x = torch.randn(3, 4, 32, generator=torch.Generator().manual_seed(1))
    flat = x.reshape(12, 32)
    _, chosen, _ = top_k_routing(torch.nn.functional.linear(flat, unit.router.detach()), 2)
    keep = _naive_keep(chosen, 4, 0.6)
    assert sum(not k for row in keep for k in row) > 0  # the limit drops something here
    expected = _naive_update(flat, unit, keep).view(3, 4, -1)
    torch.testing.assert_close(_module_update(model, module, x), expected, rtol=1e-5, atol=1e-5)


def test_more_experts_in_higher_layers_per_stack():
    model = T5.build()
    report = dt.attach(model, MoLoRAConfig(r=2, experts_per_layer=(2, 4), targets=["q", "v"]), name="x")
    experts = {path: unit.num_experts for path, unit in units_of(model, "x")}
    assert experts == {p: 2 if ".block.0." in p else 4 for p in report.modules}
    assert {p.split(".")[0] for p in experts} == {"encoder", "decoder"}  # each stack split by its own depth
    quarters = MoLoRAConfig(experts_per_layer=(2, 4, 6, 8))
    assert [quarters.experts_at(i, 8) for i in range(8)] == [2, 2, 4, 4, 6, 6, 8, 8]


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("fields,named", [
    ({"r": 0}, "rank r"), ({"num_experts": 0}, "num_experts"), ({"top_k": 0}, "top_k"),
    ({"num_experts": 3, "top_k": 4}, "top_k=4 is larger than num_experts"),
    ({"experts_per_layer": (4, 1)}, "top_k=2 is larger than experts_per_layer's smallest"),
    ({"experts_per_layer": (0, 4)}, "experts_per_layer"), ({"aux_loss_coef": -1.0}, "aux_loss_coef"),
    ({"capacity_factor": 0.0}, "capacity_factor"), ({"dropout": 1.0}, "dropout"), ({"alpha": 0.0}, "alpha"),
])
def test_bad_field_values_fail_at_construction_naming_the_field(fields, named):
    with pytest.raises(dt.ConfigError, match=named):
        MoLoRAConfig(**fields)


def test_modules_it_cannot_adapt_fail_at_attach_and_leave_the_model_untouched():
    model = BERT.build()
    assert_target_refused_at_attach(model, MoLoRAConfig(experts_per_layer=(2, 4), targets=["query", "classifier"]),
                                    r"classifier \(Linear, in 32, out 3\) is not inside a transformer block")
    assert_target_refused_at_attach(model, MoLoRAConfig(targets=["word_embeddings"]), "Embedding")
    assert not any(hasattr(m, "deltas") for m in model.modules())


# ---------------------------------------------------------------------------------------------
# mixed batches


def _three_deltas(capacity_factor=None):
    model = BERT.build()
    configs = {"a": MoLoRAConfig(r=2, targets=["query", "value"], capacity_factor=capacity_factor),
               "b": MoLoRAConfig(r=3, num_experts=3, top_k=1, targets=["query", "key"], capacity_factor=capacity_factor),
               "c": MoLoRAConfig(r=2, experts_per_layer=(2, 5), targets=["value"])}
    for i, (name, config) in enumerate(configs.items()):
        dt.attach(model, config, name=name)
        randomise(model, name, i + 1)
    return model


def test_mixed_batch_rows_equal_each_row_alone():
    model = _three_deltas()
    rows = ["a", "b", None, "c", "a", "b"]
    inputs = padded_token_batch(len(rows))
    with torch.no_grad():
        mixed = BERT.output(model, {**inputs, "delta_ids": rows})
    assert_each_row_equals_it_alone(BERT, model, rows, inputs, mixed)


def test_with_a_capacity_limit_a_deltas_rows_equal_those_rows_run_as_their_own_batch():
    model = _three_deltas(capacity_factor=0.5)
    rows = ["a", "b", "a", None, "b", "a"]
    inputs = padded_token_batch(len(rows))
    with torch.no_grad():
        mixed = BERT.output(model, {**inputs, "delta_ids": rows})
        for name in ("a", "b"):
            mine = [i for i, r in enumerate(rows) if r == name]
            with dt.using(model, name):
                own = BERT.output(model, {k: v[mine] for k, v in inputs.items()})
            torch.testing.assert_close(mixed[mine], own, rtol=1e-5, atol=1e-5)


def test_balancing_statistics_of_a_mixed_batch_count_each_deltas_rows():
    model = _three_deltas()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    rows = ["a", "b", "a", None]
    inputs = padded_token_batch(len(rows))
    with torch.no_grad():
        BERT.output(model, {**inputs, "delta_ids": rows})
        mixed = {name: [u.aux_loss for _, u in units_of(model, name)] for name in ("a", "b")}
        for name in ("a", "b"):
            mine = [i for i, r in enumerate(rows) if r == name]
            with dt.using(model, name):
                BERT.output(model, {k: v[mine] for k, v in inputs.items()})
            alone = [u.aux_loss for _, u in units_of(model, name)]
            torch.testing.assert_close(torch.stack(mixed[name]), torch.stack(alone))


def test_a_mixed_batch_trains_every_routed_delta():
    assert_a_mixed_batch_trains_every_routed_delta(MoLoRAConfig(r=2, num_experts=2, top_k=1, renormalize=False,
                                                                targets=["query"]))


def test_with_one_expert_per_token_plain_gates_let_the_task_loss_train_the_router():
    for renormalize in (True, False):
        model = BERT.build()
        dt.attach(model, MoLoRAConfig(r=2, top_k=1, renormalize=renormalize, targets=["query"]), name="x")
        randomise(model, "x")
        BERT.output(model).sum().backward()
        largest = max(u.router.grad.abs().max().item() for _, u in units_of(model, "x"))
        assert (largest > 1e-9) == (not renormalize)  # a renormalised single gate is 1: no gradient (to rounding)


# ---------------------------------------------------------------------------------------------
# merging, files


def test_merge_fold_and_task_vectors_are_refused_with_the_reason(tmp_path):
    model = BERT.build()
    dt.attach(model, MoLoRAConfig(r=2, targets=["query"]), name="x")
    for action in (dt.merge, dt.fold):
        with pytest.raises(dt.MergeError, match="changes activations, not weights"):
            action(model)
    with pytest.raises(dt.MergeError, match="changes activations, not weights"):
        dt.TaskVector.from_delta(model, "x")
    unit = next(u for _, u in units_of(model, "x"))
    with pytest.raises(dt.MergeError, match="router picks experts per token"):
        unit.merge_params(None, {})
    assert not dt.get_method("molora").mergeable


def test_a_delta_with_experts_by_depth_reloads_on_a_fresh_base(tmp_path):
    model = BERT.build()
    dt.attach(model, MoLoRAConfig(r=2, experts_per_layer=(3, 5), capacity_factor=1.0, targets=["query"]), name="x")
    randomise(model, "x", 4)
    expected = BERT.output(model)
    dt.save(model, tmp_path / "d")
    fresh = BERT.build()
    dt.load(fresh, tmp_path / "d")
    assert [u.num_experts for _, u in units_of(fresh, "x")] == [3, 5]
    torch.testing.assert_close(BERT.output(fresh), expected, rtol=0, atol=0)


def test_peft_export_is_refused_naming_why(tmp_path):
    model = BERT.build()
    dt.attach(model, MoLoRAConfig(r=2, targets=["query"]), name="x")
    assert_peft_export_is_refused(tmp_path, model, "mixture of LoRA experts")


# ---------------------------------------------------------------------------------------------
# training: the loss term in the history, the router statistics in metrics.json


def test_the_training_loop_adds_the_balancing_loss_to_the_logged_loss(tmp_path):
    from deltatune.train import loop

    data = encoded_examples(tmp_path, 8)
    model = BERT.build()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    dt.attach(model, MoLoRAConfig(r=2, aux_loss_coef=5.0, targets=["query", "value"]), name="x")
    randomise(model, "x")
    batch = data.collate(list(range(8)))
    model.train()
    with torch.no_grad():
        task = model(**batch).loss
        term = loss_terms(model)
    assert term.item() >= 5.0 * 0.999  # the balancing loss is at least about 1 per layer
    result = loop.train(model, data, loop.Settings(steps=1, batch_size=8, lr=1e-3, progress=False))
    assert result["history"].train[0][1] == pytest.approx((task + term).item(), abs=1e-5)


def test_train_from_flags_writes_the_expert_load_per_layer(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, [
        "--method", "molora", "--r", "2", "--experts-per-layer", "2,4", "--top-k", "2", "--capacity-factor", "1.5",
        "--aux-loss-coef", "0.1"])
    assert dt.read_meta(out)["config"]["experts_per_layer"] == [2, 4]
    stats = json.loads((out / "metrics.json").read_text())["delta_stats"]["molora"]
    assert stats["top_k"] == 2
    layers = stats["layers"]
    assert layers and all(".layer." in path for path in layers)
    for path, layer in layers.items():
        assert len(layer["load"]) == (2 if ".layer.0." in path else 4)
        assert layer["tokens"] == next(iter(layers.values()))["tokens"] > 6 * 8  # 6 steps of 8 rows, every token
        assert sum(layer["load"]) == pytest.approx(2.0, abs=1e-4)  # each token chose two experts
        assert 0 <= layer["dropped"] < 1
    assert len(json.loads((out / "history.json").read_text())["train"]) == 6
