"""Delta algebra: the merge maths on small hand-computed tensors, and task vectors on tiny models.

References: values worked out by hand (in the comments), the real peft package's merge
functions, each unit's own ``delta_weight``/``merge``, and a model's own fine-tuned outputs.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra import LowRankEntry, TaskVector, combine, interpolate


def _perturb(model, name: str, scale: float = 0.1, seed: int = 7) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, name):
            param.add_(scale * torch.randn(param.shape, generator=generator))


def _lora(case_name: str = "bert", targets=("query", "value"), r: int = 4, seed: int = 7, name: str = "a", model=None,
          **options):
    case = MODELS[case_name]
    model = case.build() if model is None else model
    dt.attach(model, dt.LoRAConfig(r=r, targets=list(targets), **options), name=name)
    _perturb(model, name, seed=seed)
    return case, model


# -- pure tensor functions ---------------------------------------------------------------------

def test_linear_is_the_weighted_sum():
    a, b = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([4.0, 0.0, -1.0])
    assert torch.equal(combine.linear([a, b], [0.5, 2.0]), torch.tensor([8.5, -1.0, -0.5]))


def test_trim_and_magnitude_prune_keep_the_largest_values():
    d1 = torch.tensor([3.0, -1.0, 0.5, -4.0])
    d2 = torch.tensor([0.1, 2.0, -0.3, 1.0])
    # density 0.5 of 4 values keeps 2: d1 -> [3, 0, 0, -4], d2 -> [0, 2, 0, 1]
    assert torch.equal(combine.trim(d1, 0.5), torch.tensor([3.0, 0.0, 0.0, -4.0]))
    assert combine.keep_count(4, 0.5) == 2 and combine.keep_count(10, 0.25) == 3 and combine.keep_count(10, 0.01) == 1
    # weights 1 and 0.5: [3, 1, 0, -3.5]
    merged = combine.magnitude_prune([d1, d2], [1.0, 0.5], 0.5)
    assert torch.equal(merged, torch.tensor([3.0, 1.0, 0.0, -3.5]))


def test_ties_trims_elects_sign_and_takes_the_disjoint_mean():
    d1 = torch.tensor([2.0, -1.0, 3.0, 0.5])
    d2 = torch.tensor([-3.0, 1.0, 1.5, 0.2])
    d3 = torch.tensor([1.0, 2.0, -4.0, 0.1])
    # trimmed to 2 of 4: [2, 0, 3, 0], [-3, 0, 1.5, 0], [0, 2, -4, 0]
    # totals -1, 2, 0.5, 0 elect signs -, +, +, + (a zero total elects +)
    # agreeing values: {-3}, {2}, {3, 1.5}, {} -> means -3, 2, 2.25, 0
    assert torch.equal(combine.ties([d1, d2, d3], [1.0, 1.0, 1.0], 0.5), torch.tensor([-3.0, 2.0, 2.25, 0.0]))
    # weights 1, 2, 1: weighted [2, 0, 3, 0], [-6, 0, 3, 0], [0, 2, -4, 0]; totals -4, 2, 2, 0
    # agreeing: {-6}, {2}, {3, 3}, {} -> -6, 2, 3, 0
    assert torch.equal(combine.ties([d1, d2, d3], [1.0, 2.0, 1.0], 0.5), torch.tensor([-6.0, 2.0, 3.0, 0.0]))


def test_dare_keeps_values_with_probability_density_and_rescales_them():
    delta = torch.arange(1.0, 201.0)
    dropped = combine.drop_and_rescale(delta, 0.25, torch.Generator().manual_seed(3))
    kept = dropped != 0
    assert torch.equal(dropped[kept], delta[kept] / 0.25)  # kept values are rescaled by 1/density
    assert 0.15 < kept.float().mean() < 0.35  # 200 Bernoulli(0.25) draws: mean 0.25, std 0.031
    again = combine.drop_and_rescale(delta, 0.25, torch.Generator().manual_seed(3))
    assert torch.equal(dropped, again)
    assert torch.equal(combine.drop_and_rescale(delta, 1.0, torch.Generator().manual_seed(3)), delta)


def test_dare_expectation_equals_the_original():
    # One DARE sample of value d is d/p with probability p, else 0: mean d, variance d^2 (1-p)/p.
    # The mean of T independent samples has standard deviation |d| sqrt((1-p)/(p T)); with
    # T = 4000 and p = 0.3 that is 0.024 |d|. Over 48 values a 5-sigma bound fails by chance
    # with probability below 48 * 6e-7 (and the seed is fixed).
    p, trials = 0.3, 4000
    delta = torch.randn(48, generator=torch.Generator().manual_seed(0))
    generator = torch.Generator().manual_seed(1)
    mean = torch.stack([combine.drop_and_rescale(delta, p, generator) for _ in range(trials)]).mean(0)
    sigma = delta.abs() * math.sqrt((1 - p) / (p * trials))
    assert ((mean - delta).abs() <= 5 * sigma).all()
    # and the bound is not vacuous: a biased estimator (no rescale) fails it
    assert not ((mean * p - delta).abs() <= 5 * sigma).all()


def test_dare_linear_and_dare_ties_at_density_one_are_linear_and_ties():
    deltas = [torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    generator = torch.Generator().manual_seed(0)
    torch.testing.assert_close(combine.dare_linear(deltas, [0.2, 0.3, 0.5], 1.0, generator),
                               combine.linear(deltas, [0.2, 0.3, 0.5]))
    torch.testing.assert_close(combine.dare_ties(deltas, [1, 1, 1], 1.0, generator),
                               combine.ties(deltas, [1, 1, 1], 1.0))


def test_ties_and_magnitude_prune_match_peft_with_unit_weights():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    deltas = [torch.randn(16, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ones = torch.ones(3)
    # density * 192 values is a whole number, so both keep the same count (peft truncates, we round)
    torch.testing.assert_close(combine.ties(deltas, [1, 1, 1], 0.25), merge_utils.ties(deltas, ones, 0.25))
    torch.testing.assert_close(combine.magnitude_prune(deltas, [0.2, 0.5, 1.0], 0.25),
                               merge_utils.magnitude_prune(deltas, torch.tensor([0.2, 0.5, 1.0]), 0.25))
    torch.testing.assert_close(combine.linear(deltas, [0.2, 0.5, 1.0]),
                               merge_utils.task_arithmetic(deltas, torch.tensor([0.2, 0.5, 1.0])))


def test_metrics_weights_follow_the_documented_formula():
    # w_i = exp(-penalty * loss_i) / sum_j exp(-penalty * loss_j); penalty 2, losses 0.2 and 0.7:
    # w_1 = 1 / (1 + exp(-1)) = 0.731059
    assert combine.metrics_weights([0.2, 0.7], 2.0) == pytest.approx([0.731059, 0.268941], abs=1e-6)
    assert combine.metrics_weights([0.2, 0.7, 5.0], 0.0) == pytest.approx([1 / 3] * 3)
    assert combine.metrics_weights([1000.0, 1001.0], 1.0) == pytest.approx([0.731059, 0.268941], abs=1e-6)


@pytest.mark.parametrize("weights,message", [([1.0], "got 1 weights for 2 deltas"),
                                             ([1.0, float("nan")], "must be finite")])
def test_bad_weights_are_refused(weights, message):
    with pytest.raises(dt.ConfigError, match=message):
        combine.linear([torch.ones(2), torch.ones(2)], weights)


@pytest.mark.parametrize("density", [0.0, -0.1, 1.5, float("nan")])
def test_density_outside_zero_one_is_refused(density):
    with pytest.raises(dt.ConfigError, match=r"density .* must be in \(0, 1\]"):
        combine.ties([torch.ones(2)], [1.0], density)


def test_deltas_of_different_shapes_are_refused():
    with pytest.raises(dt.MergeError, match="one shape"):
        combine.linear([torch.ones(2, 3), torch.ones(3, 2)], [1.0, 1.0])


# -- task vectors ------------------------------------------------------------------------------

def test_a_lora_task_vector_is_factored_and_equals_its_delta_weight():
    _case, model = _lora(r=4, alpha=12.0)
    vector = TaskVector.from_delta(model, "a")
    query = "bert.encoder.layer.0.attention.self.query"
    entry = vector[f"{query}.weight"]
    assert isinstance(entry, LowRankEntry) and entry.rank == 4 and vector.is_factored
    unit = model.get_submodule(query).deltas["a"]
    torch.testing.assert_close(entry.dense(), unit.delta_weight(), rtol=1e-5, atol=1e-7)  # s folded into B first
    names = {f"bert.encoder.layer.{i}.attention.self.{m}.weight" for i in (0, 1) for m in ("query", "value")}
    assert set(vector.keys()) == names


def test_lora_sums_stay_factored_with_concatenated_ranks():
    _, model = _lora(r=4, name="a")
    _lora(r=2, targets=("query",), name="b", seed=8, model=model)
    a, b = TaskVector.from_delta(model, "a"), TaskVector.from_delta(model, "b")
    total = a + b
    query = "bert.encoder.layer.0.attention.self.query.weight"
    value = "bert.encoder.layer.0.attention.self.value.weight"
    assert isinstance(total[query], LowRankEntry) and total[query].rank == 6
    assert isinstance(total[value], LowRankEntry) and total[value].rank == 4  # only a adapts value
    torch.testing.assert_close(total[query].dense(), a[query].dense() + b[query].dense())
    difference = 2 * a - b / 2
    assert isinstance(difference[query], LowRankEntry) and difference[query].rank == 6
    torch.testing.assert_close(difference[query].dense(), 2 * a[query].dense() - 0.5 * b[query].dense())
    assert sum([a, b]).keys() == total.keys()


def test_a_plus_b_minus_b_equals_a_and_negation_undoes():
    _, model = _lora(name="a")
    _lora(name="b", seed=8, model=model)
    a, b = TaskVector.from_delta(model, "a"), TaskVector.from_delta(model, "b")
    for key, value in (a + b - b).dense().items():
        torch.testing.assert_close(value, a[key].dense(), rtol=1e-5, atol=1e-6)
    negated = -a
    for key, value in (-negated).dense().items():
        torch.testing.assert_close(value, a[key].dense(), rtol=0, atol=0)
    assert math.isclose((a - a).norm(), 0.0, abs_tol=1e-6)


def test_norm_of_factored_entries_equals_the_dense_norm():
    _, model = _lora(name="a")
    vector = TaskVector.from_delta(model, "a")
    dense_norm = math.sqrt(sum(float(v.square().sum()) for v in vector.dense().values()))
    assert vector.norm() == pytest.approx(dense_norm, rel=1e-5)


def test_interpolate_goes_from_a_to_b():
    _, model = _lora(name="a")
    _lora(name="b", seed=8, model=model)
    a, b = TaskVector.from_delta(model, "a"), TaskVector.from_delta(model, "b")
    for t, expected in [(0.0, a), (1.0, b)]:
        for key, value in interpolate(a, b, t).dense().items():
            torch.testing.assert_close(value, expected[key].dense(), rtol=1e-6, atol=1e-7)
    middle = interpolate(a, b, 0.25).dense()
    for key in a:
        torch.testing.assert_close(middle[key], 0.75 * a[key].dense() + 0.25 * b[key].dense())


def test_mixing_dense_and_factored_entries_gives_dense():
    _, model = _lora(name="a")
    a = TaskVector.from_delta(model, "a")
    mixed = a + TaskVector(a.dense())
    assert not mixed.is_factored and all(isinstance(v, torch.Tensor) for _, v in mixed.items())
    for key, value in mixed.items():
        torch.testing.assert_close(value, 2 * a[key].dense())


@pytest.mark.parametrize("case_name,targets", [("bert", ("query", "value", "word_embeddings")),
                                               ("gpt2", ("c_attn", "mlp.c_fc")), ("llama", ("q_proj", "down_proj"))])
def test_to_delta_of_a_lora_vector_is_an_exact_lora(case_name, targets):
    case, model = _lora(case_name, targets=targets, r=4, alpha=8.0, use_rslora=True)
    expected = case.output(model)
    vector = TaskVector.from_delta(model, "a")
    fresh = case.build()
    report = vector.to_delta(fresh, "copy")
    config = dt.get_config(fresh, "copy")
    assert report.method == "lora" and config.r == 4 and config.scaling == 1.0
    torch.testing.assert_close(case.output(fresh), expected, rtol=1e-5, atol=1e-6)


def test_to_delta_with_rank_compresses_by_svd():
    case, model = _lora(r=2)
    expected = case.output(model)
    fresh = case.build()
    vector = TaskVector.from_delta(model, "a")
    vector.to_delta(fresh, "svd", rank=6)  # rank 6 >= the true rank 2: exact (singular values 3..6 are ~0)
    assert dt.get_config(fresh, "svd").r == 6
    torch.testing.assert_close(case.output(fresh), expected, rtol=1e-4, atol=1e-5)
    compressed = vector.low_rank(1)
    for key, entry in compressed.items():
        singular = torch.linalg.svdvals(vector[key].dense().double())
        assert entry.rank == 1 and entry.energy_kept == pytest.approx(float(singular[0] ** 2 / singular.square().sum()))


def test_a_dense_change_compressed_to_lora_fits_conv1d_and_embedding_orientation():
    case = MODELS["gpt2"]  # Conv1D stores (in, out); embeddings (num, dim)
    base = case.build()
    generator = torch.Generator().manual_seed(0)
    changes = {}
    for key in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_fc.weight", "transformer.wpe.weight"):
        param = base.get_parameter(key)
        out_in = param.T.shape  # LoRA's (out, in) is the transpose of both a Conv1D weight and an embedding table
        low = torch.randn(out_in[0], 3, generator=generator) @ torch.randn(3, out_in[1], generator=generator)
        changes[key] = 0.05 * low.T  # the parameter's own shape
    vector = TaskVector(changes)
    reference = case.build()
    vector.apply_to(reference)
    report = vector.to_delta(base, "lora", rank=3)
    assert report.method == "lora" and dt.get_config(base, "lora").r == 3
    torch.testing.assert_close(case.output(base), case.output(reference), rtol=1e-4, atol=1e-5)


def test_rank_compression_refuses_vectors_that_are_not_matrices():
    with pytest.raises(dt.MergeError, match="only matrices can be compressed"):
        TaskVector({"fc1.bias": torch.ones(16)}).low_rank(2)


@pytest.mark.parametrize("method", ["dora", "ia3", "bitfit"])
def test_other_mergeable_methods_give_their_merged_weight_change(method):
    case = MODELS["bert"]
    model = case.build()
    config = {"dora": dt.DoRAConfig(r=4), "ia3": dt.IA3Config(), "bitfit": dt.BitFitConfig()}[method]
    dt.attach(model, config, name="a")
    _perturb(model, "a")
    expected = case.output(model)
    vector = TaskVector.from_delta(model, "a")
    assert vector.keys() and not any(isinstance(v, LowRankEntry) for _, v in vector.items())
    fresh = case.build()
    vector.apply_to(fresh)
    torch.testing.assert_close(case.output(fresh), expected, rtol=1e-5, atol=1e-5)
    again = case.build()
    vector.to_delta(again, "as_dense")
    assert dt.get_config(again, "as_dense").method == "dense"
    torch.testing.assert_close(case.output(again), expected, rtol=1e-5, atol=1e-5)


def _fine_tune(model, seed: int = 3):
    """A stand-in for full fine-tuning: every parameter moved (embeddings, norms, biases, head)."""
    tuned = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in tuned.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return tuned


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama"])
def test_from_models_applied_back_equals_the_fine_tuned_model(case_name):
    case = MODELS[case_name]
    base = case.build()
    tuned = _fine_tune(base)
    vector = TaskVector.from_models(base, tuned)
    assert len(vector) == len(list(dt.base_parameters(base)))
    expected = case.output(tuned)
    vector.apply_to(base)
    torch.testing.assert_close(case.output(base), expected, rtol=1e-5, atol=1e-5)
    vector.apply_to(base, scale=-1.0)  # negation undoes
    torch.testing.assert_close(case.output(base), case.output(case.build()), rtol=1e-5, atol=1e-5)


def test_a_full_fine_tune_becomes_an_exact_dense_delta():
    case = MODELS["bert"]  # untied: embeddings, LayerNorms, linears with biases, a classifier
    base = case.build()
    tuned = _fine_tune(base)
    report = TaskVector.from_models(base, tuned).to_delta(base, "full")
    assert report.method == "dense" and dt.get_config(base, "full").bias
    torch.testing.assert_close(case.output(base), case.output(tuned), rtol=1e-5, atol=1e-5)
    with dt.base_only(base):
        torch.testing.assert_close(case.output(base), case.output(case.build()), rtol=0, atol=0)
    dt.merge(base)
    torch.testing.assert_close(case.output(base), case.output(tuned), rtol=1e-5, atol=1e-5)


def test_from_folder_leaves_the_model_as_it_was(tmp_path):
    case, model = _lora()
    dt.save(model, tmp_path / "a")
    fresh = case.build()
    vector = TaskVector.from_folder(fresh, tmp_path / "a")
    assert not dt.list_deltas(fresh)
    for key, value in TaskVector.from_delta(model, "a").dense().items():
        torch.testing.assert_close(vector[key].dense(), value, rtol=0, atol=0)
    with pytest.raises(dt.FingerprintError, match="another base"):
        TaskVector.from_folder(case.build(seed=1), tmp_path / "a")


def test_bad_task_vectors_and_targets_are_refused():
    case = MODELS["bert"]
    model = case.build()
    with pytest.raises(dt.MergeError, match="NaN or inf"):
        TaskVector({"classifier.weight": torch.full((3, 32), float("nan"))})
    with pytest.raises(dt.MergeError, match="has no parameter 'fc1.weight'"):
        TaskVector({"fc1.weight": torch.ones(16, 8)}).apply_to(model)
    with pytest.raises(dt.MergeError, match=r"has shape \(3, 3\) but the model's parameter has \(3, 32\)"):
        TaskVector({"classifier.weight": torch.ones(3, 3)}).apply_to(model)
    with pytest.raises(dt.MergeError, match="NaN or inf; nothing was changed"):
        TaskVector({"classifier.weight": torch.full((3, 32), 1e38)}).apply_to(model, scale=1e38)
    cnn = MODELS["cnn"].build()
    with pytest.raises(dt.MergeError, match="Conv2d is not a Linear, Conv1D, Embedding or LayerNorm"):
        TaskVector({"conv1.weight": torch.ones(8, 3, 3, 3)}).to_delta(cnn, "x")
    assert not dt.list_deltas(cnn)
    dt.attach(model, dt.PrefixConfig(num_virtual_tokens=2), name="prefix")
    with pytest.raises(dt.MergeError, match="changes activations, not weights"):
        TaskVector.from_delta(model, "prefix")


def test_apply_to_refuses_a_model_with_merged_deltas():
    _case, model = _lora()
    dt.merge(model)
    with pytest.raises(dt.DeltaStateError, match="unmerge"):
        TaskVector.from_delta(model, "a").apply_to(model)
