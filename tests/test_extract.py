"""Low-rank approximation and post-hoc LoRA extraction against exact references.

References: planted low-rank matrices (exact recovery), the Eckart–Young optimum computed
from singular values obtained independently (eigenvalues of ``ΔᵀΔ``), spectra chosen by hand
(energy mode), and the fine-tuned model's own outputs (extraction on tiny models).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import transformers
from tiny_models import MODELS

import deltatune as dt
from deltatune.algebra.extract import extract_lora
from deltatune.algebra.lowrank import low_rank
from deltatune.cli import main
from deltatune.errors import ConfigError, TargetError


def _orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))[0]


def _with_spectrum(singular_values: list[float], out: int = 12, inp: int = 9, seed: int = 0) -> torch.Tensor:
    """``U diag(s) Vᵀ`` with random orthonormal U, V: a matrix whose singular values are exactly ``s``."""
    k = len(singular_values)
    return _orthonormal(out, k, seed) @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ _orthonormal(
        inp, k, seed + 1).T


def _planted(out: int, inp: int, rank: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factors = torch.randn(out, rank, generator=generator, dtype=dtype), torch.randn(rank, inp, generator=generator, dtype=dtype)
    return factors[0] @ factors[1]


def _singular_values_independently(matrix: torch.Tensor) -> torch.Tensor:
    """Singular values as square roots of the eigenvalues of ``MᵀM``, descending (no SVD involved)."""
    eigenvalues = torch.linalg.eigvalsh(matrix.T @ matrix).clamp(min=0)
    return eigenvalues.flip(0).sqrt()


# -- low_rank ----------------------------------------------------------------------------------

def test_planted_low_rank_update_is_recovered_exactly():
    delta = _planted(40, 30, rank=5, seed=0)
    approx = low_rank(delta, rank=5)
    assert approx.B.shape == (40, 5) and approx.A.shape == (5, 30) and approx.rank == 5
    torch.testing.assert_close(approx.B @ approx.A, delta, rtol=0, atol=1e-10)
    assert approx.relative_error < 1e-12 and approx.energy_kept == pytest.approx(1.0, abs=1e-12)


def test_float32_planted_update_is_recovered_to_float32_precision():
    delta = _planted(64, 48, rank=4, seed=1, dtype=torch.float32)
    approx = low_rank(delta, rank=4)
    assert approx.B.dtype == torch.float32
    assert torch.linalg.norm(delta - approx.B @ approx.A) / torch.linalg.norm(delta) < 1e-6


@pytest.mark.parametrize("rank", [1, 3, 6])
def test_low_rank_plus_noise_reaches_the_eckart_young_optimum(rank):
    generator = torch.Generator().manual_seed(2)
    delta = _planted(50, 35, rank=3, seed=2) + 0.3 * torch.randn(50, 35, generator=generator, dtype=torch.float64)
    singular = _singular_values_independently(delta)
    optimum = math.sqrt(float(singular[rank:].square().sum() / singular.square().sum()))
    approx = low_rank(delta, rank=rank)
    measured = float(torch.linalg.norm(delta - approx.B @ approx.A) / torch.linalg.norm(delta))
    assert measured == pytest.approx(optimum, rel=1e-9)
    assert approx.relative_error == pytest.approx(optimum, rel=1e-9)
    assert approx.energy_kept == pytest.approx(float(singular[:rank].square().sum() / singular.square().sum()), rel=1e-9)


def test_singular_values_are_split_evenly_between_the_factors():
    approx = low_rank(_with_spectrum([4.0, 3.0, 2.0, 1.0]), rank=3)
    expected = torch.diag(torch.tensor([4.0, 3.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(approx.B.T @ approx.B, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(approx.A @ approx.A.T, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (16 / 30, 1), (0.8, 2), (25 / 30, 2), (0.84, 3), (0.97, 4), (1.0, 4)])
def test_energy_mode_picks_the_smallest_rank_reaching_the_fraction(energy, rank):
    # squared singular values 16, 9, 4, 1 of 30: cumulative fractions 0.533, 0.833, 0.967, 1
    approx = low_rank(_with_spectrum([4.0, 3.0, 2.0, 1.0]), energy=energy)
    assert approx.rank == rank
    assert approx.energy_kept == pytest.approx([16, 25, 29, 30][rank - 1] / 30, abs=1e-12)


def test_rank_above_the_matrix_size_gives_the_full_matrix():
    delta = _planted(6, 4, rank=4, seed=3)
    approx = low_rank(delta, rank=10)
    assert approx.rank == 4
    torch.testing.assert_close(approx.B @ approx.A, delta, rtol=0, atol=1e-12)


def test_randomized_svd_is_close_to_the_exact_one():
    decaying = [float(0.8**i) for i in range(60)]
    delta = _with_spectrum(decaying, out=300, inp=200, seed=4)
    exact = low_rank(delta, rank=10)
    randomized = low_rank(delta, rank=10, randomized=True, seed=0)
    assert randomized.rank == 10
    assert randomized.relative_error == pytest.approx(exact.relative_error, rel=1e-3)
    assert randomized.relative_error >= exact.relative_error * (1 - 1e-9)  # never better than the optimum
    torch.testing.assert_close(randomized.B @ randomized.A, exact.B @ exact.A, rtol=0, atol=1e-4)
    assert low_rank(delta, energy=0.99, randomized=True).rank == low_rank(delta, energy=0.99).rank


def test_randomized_svd_is_reproducible_and_leaves_the_global_generator_alone():
    delta = _planted(80, 60, rank=20, seed=5)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = low_rank(delta, rank=5, randomized=True, seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(first.B, low_rank(delta, rank=5, randomized=True, seed=7).B)


def test_all_zero_delta_gives_an_empty_or_zero_factorisation():
    by_energy = low_rank(torch.zeros(5, 4), energy=0.9)
    assert by_energy.rank == 0 and by_energy.B.shape == (5, 0) and by_energy.A.shape == (0, 4)
    assert by_energy.relative_error == 0.0 and by_energy.energy_kept == 1.0
    by_rank = low_rank(torch.zeros(5, 4), rank=2)
    assert by_rank.rank == 2 and not by_rank.B.any() and not by_rank.A.any()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({}, "exactly one of rank or energy"),
    ({"rank": 2, "energy": 0.5}, "exactly one of rank or energy"),
    ({"rank": 0}, "rank must be an integer >= 1"),
    ({"energy": 0.0}, "energy must be a fraction in"),
    ({"energy": 1.5}, "energy must be a fraction in"),
])
def test_bad_rank_or_energy_is_refused(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        low_rank(torch.ones(3, 3), **kwargs)


def test_non_matrix_or_non_finite_delta_is_refused():
    with pytest.raises(ConfigError, match="2-D delta"):
        low_rank(torch.ones(2, 3, 4), rank=1)
    with pytest.raises(ConfigError, match="NaN or inf"):
        low_rank(torch.tensor([[1.0, float("nan")]]), rank=1)


# -- extraction from models --------------------------------------------------------------------

def _fine_tune_by_planting(case_name: str, ranks: dict[str, int] | None = None, default_rank: int = 2,
                           change_head: bool = False):
    """A copy of a tiny model whose Linear/Conv1D weights each get a planted low-rank change."""
    case = MODELS[case_name]
    finetuned = case.build(0)
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for path, module in finetuned.named_modules():
            weight = getattr(module, "weight", None)
            if weight is None or weight.dim() != 2 or isinstance(module, torch.nn.Embedding) or path.endswith("lm_head"):
                continue
            if path == "classifier" and not change_head:
                continue
            rank = (ranks or {}).get(path, default_rank)
            rows, cols = weight.shape
            weight += 0.1 * torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)
    return case, finetuned


def test_extracted_lora_reproduces_the_planted_fine_tune(tmp_path):
    case, finetuned = _fine_tune_by_planting("bert", change_head=True)
    model, report = extract_lora(case.build(0), finetuned, rank=2, modules_to_save=["classifier"])
    torch.testing.assert_close(case.output(model), case.output(finetuned), rtol=0, atol=1e-5)
    assert {layer.rank for layer in report.layers} == {2} and report.relative_error < 1e-6
    assert report.carried == ("classifier",) and report.uncovered == ()
    dt.save(model, tmp_path / "extracted")
    fresh = case.build(0)
    dt.load(fresh, tmp_path / "extracted")
    torch.testing.assert_close(case.output(fresh), case.output(finetuned), rtol=0, atol=1e-5)


def test_energy_mode_gives_each_layer_its_planted_rank_and_saves_it(tmp_path):
    ranks = {"bert.encoder.layer.0.attention.self.query": 1, "bert.encoder.layer.1.output.dense": 5}
    case, finetuned = _fine_tune_by_planting("bert", ranks, default_rank=3)
    model, report = extract_lora(case.build(0), finetuned, energy=1.0)
    found = {layer.path: layer.rank for layer in report.layers}
    assert found == {path: ranks.get(path, 3) for path in found} and len(found) == 13
    torch.testing.assert_close(case.output(model), case.output(finetuned), rtol=0, atol=1e-5)
    dt.save(model, tmp_path / "extracted")
    config = json.loads((tmp_path / "extracted" / "delta.json").read_text())["config"]
    assert config["r"] == 3 and config["rank_pattern"] == ranks  # the most common rank is r; the others are listed
    fresh = case.build(0)
    dt.load(fresh, tmp_path / "extracted")
    torch.testing.assert_close(case.output(fresh), case.output(finetuned), rtol=0, atol=1e-5)


def test_truncated_extraction_error_matches_the_layers_optimum():
    case, finetuned = _fine_tune_by_planting("bert", default_rank=4)
    base = case.build(0)
    _, report = extract_lora(case.build(0), finetuned, rank=2)
    for layer in report.layers:
        change = (finetuned.get_submodule(layer.path).weight - base.get_submodule(layer.path).weight).double().detach()
        singular = _singular_values_independently(change)
        assert layer.relative_error == pytest.approx(math.sqrt(float(singular[2:].square().sum() / singular.square().sum())),
                                                     rel=1e-6)


def test_gpt2_conv1d_layers_are_extracted_and_the_tied_head_is_left_out():
    case, finetuned = _fine_tune_by_planting("gpt2")
    model, report = extract_lora(case.build(0), finetuned, rank=2, randomized=True)
    assert "lm_head" not in [layer.path for layer in report.layers]
    assert any(layer.path.endswith("attn.c_attn") and layer.shape == (96, 32) for layer in report.layers)
    torch.testing.assert_close(case.output(model), case.output(finetuned), rtol=0, atol=1e-4)


def test_changes_outside_the_lora_are_reported():
    case, finetuned = _fine_tune_by_planting("bert")
    with torch.no_grad():
        finetuned.bert.embeddings.LayerNorm.bias += 0.5
    _, report = extract_lora(case.build(0), finetuned, rank=2, targets=["query", "value"])
    assert len(report.layers) == 4 and report.uncovered[0] == "bert.embeddings.LayerNorm.bias"
    assert "bert.encoder.layer.0.attention.self.key.weight" in report.uncovered
    table = str(report)
    assert "bert.encoder.layer.1.attention.self.value" in table and "changed but not in the delta" in table


def test_models_of_different_architectures_are_refused():
    with pytest.raises(ConfigError, match="does not have the base"):
        extract_lora(MODELS["bert"].build(0), MODELS["gpt2"].build(0), rank=2)


def test_identical_models_have_nothing_to_extract():
    with pytest.raises(TargetError, match="nothing to extract"):
        extract_lora(MODELS["mlp"].build(0), MODELS["mlp"].build(0), rank=1)


def test_a_non_linear_target_is_refused():
    case, finetuned = _fine_tune_by_planting("bert")
    with pytest.raises(TargetError, match="Linear and Conv1D"):
        extract_lora(case.build(0), finetuned, rank=2, targets=["LayerNorm"])


def test_extract_command_reproduces_a_full_fine_tune_and_carries_its_head(tmp_path, tiny_bert, capsys):
    torch.manual_seed(4)
    finetuned = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in finetuned.bert.encoder.layer:
            weight = layer.attention.self.value.weight
            weight += 0.1 * torch.randn(32, 2, generator=generator) @ torch.randn(2, 32, generator=generator)
    finetuned.save_pretrained(tmp_path / "run" / "model")  # the layout of `train --method full`
    out = tmp_path / "extracted"
    assert main(["extract", "--base", str(tiny_bert), "--finetuned", str(tmp_path / "run"), "--energy", "0.999",
                 "--out", str(out)]) == 0
    assert "carried whole (modules_to_save): classifier" in capsys.readouterr().out
    meta = dt.read_meta(out)
    assert meta["provenance"]["model"] == str(tiny_bert) and meta["config"]["r"] == 2
    torch.manual_seed(5)  # another random head: the delta must bring the fine-tuned one
    base = transformers.BertForSequenceClassification.from_pretrained(tiny_bert, num_labels=2).eval()
    dt.load(base, out)
    ids = torch.randint(5, 28, (2, 6), generator=generator)
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, finetuned(ids).logits, rtol=0, atol=1e-5)
