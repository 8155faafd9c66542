"""EigenLoRAx (methods/eigenlora, algebra/eigenbasis): the basis against a dense eigendecomposition
done by hand, the update against its formula, only the loadings train, a saved delta loads
without its basis file, mixed batches, refusals, and the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune.algebra.eigenbasis import principal_directions
from deltatune.methods.eigenlora import EigenLoRALinear, random_orthonormal, read_basis
from method_checks import assert_rows_equal_alone, train_from_the_command_line
from tiny_models import MODELS

TOL = {"atol": 1e-5, "rtol": 1e-5}
BERT = MODELS["bert"]


def _random_factors(seed: int, out: int = 9, inp: int = 7, ranks=(2, 3, 2)):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(out, r, generator=generator), torch.randn(r, inp, generator=generator)) for r in ranks]


def _top_eigenvectors(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh(gram.double())
    order = torch.argsort(values, descending=True)[:k]
    return vectors[:, order], values[order]


def _projector(columns: torch.Tensor) -> torch.Tensor:
    return (columns @ columns.T).double()


def test_principal_directions_are_the_top_eigenvectors_of_the_summed_grams():
    factors = _random_factors(0)
    dense = [B @ A for B, A in factors]
    U, s_u, V, s_v = principal_directions(factors, 4)
    E_out, l_out = _top_eigenvectors(sum(d @ d.T for d in dense), 4)  # sum_i dW_i dW_i^T, by hand
    E_in, l_in = _top_eigenvectors(sum(d.T @ d for d in dense), 4)
    torch.testing.assert_close(_projector(U), _projector(E_out), atol=1e-5, rtol=0)  # the same subspace, sign-free
    torch.testing.assert_close(_projector(V), _projector(E_in), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_u.double(), l_out.sqrt(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(s_v.double(), l_in.sqrt(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(U.T @ U, torch.eye(4), **TOL)


def test_principal_directions_do_not_depend_on_how_B_and_A_split_the_update():
    factors = _random_factors(1)
    rescaled = [(B @ torch.diag(torch.tensor([3.0] + [0.5] * (B.shape[1] - 1))),
                 torch.diag(torch.tensor([1 / 3.0] + [2.0] * (B.shape[1] - 1))) @ A) for B, A in factors]
    U, s_u, V, _ = principal_directions(factors, 3)
    U2, s_u2, V2, _ = principal_directions(rescaled, 3)
    torch.testing.assert_close(_projector(U), _projector(U2), atol=1e-5, rtol=0)
    torch.testing.assert_close(_projector(V), _projector(V2), atol=1e-5, rtol=0)
    torch.testing.assert_close(s_u, s_u2, **TOL)


def test_k_beyond_the_span_of_the_updates_is_refused():
    with pytest.raises(dt.NotApplicableError, match=r"k=8 exceeds the 7 directions the deltas' updates span"):
        principal_directions(_random_factors(2), 8)  # ranks 2 + 3 + 2 = 7
    zero = [(torch.zeros(9, 2), torch.randn(2, 7)), (torch.zeros(9, 2), torch.randn(2, 7))]  # untrained LoRAs
    with pytest.raises(dt.NotApplicableError, match=r"exceeds the 0 directions"):
        principal_directions(zero, 1)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_update_is_scaled_U_LB_LA_D(kind):
    torch.manual_seed(0)
    module = nn.Linear(12, 7) if kind == "linear" else Conv1D(7, 12)  # Conv1D(out, in) stores (in, out)
    transposed = kind == "conv1d"
    weight = module.weight.detach().T if transposed else module.weight.detach()
    k, r, alpha = 4, 3, 6.0
    unit = EigenLoRALinear(12, 7, k, r, alpha / r, transposed)
    generator = torch.Generator().manual_seed(3)
    U, D = random_orthonormal(7, k, generator), random_orthonormal(12, k, generator).T
    unit.set_basis(U, D)
    with torch.no_grad():
        unit.up_loadings.copy_(torch.randn(k, r))
    delta = alpha / r * U @ unit.up_loadings.detach() @ unit.down_loadings.detach() @ D  # the formula, by hand
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(unit.forward_post(module, (x,), {}, module(x)), F.linear(x, weight + delta, module.bias),
                               **TOL)
    merged = unit.merge_params(module, dict(module.named_parameters()))["weight"]
    torch.testing.assert_close(merged, (weight + delta).T if transposed else weight + delta, **TOL)
    B, A, layout = unit.low_rank_update()
    assert layout == transposed and B.shape == (7, r) and A.shape == (r, 12)
    torch.testing.assert_close(B @ A, delta, **TOL)


def _two_loras(seed: int = 0, targets=None):
    """A tiny BERT with two LoRA deltas whose B factors are random (as if trained)."""
    model = BERT.build(seed)
    for i, name in enumerate(("a", "b")):
        dt.attach(model, dt.LoRAConfig(r=3, alpha=6, targets=targets), name=name)
        generator = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, param in dt.delta_parameters(model, name):
                param.copy_(torch.randn(param.shape, generator=generator))
    return model


def _lora_update(model, name: str, path: str) -> torch.Tensor:
    slot = model.get_submodule(path).deltas
    B, A, _ = slot[name].low_rank_update()
    return B @ A


def test_basis_of_two_deltas_matches_the_hand_computed_eigendecomposition_per_module():
    model = _two_loras()
    basis = dt.eigen_basis(model, ["a", "b"], k=4, augment=2)
    assert set(basis.sites) == set(model._deltatune_state.sites["a"]) and len(basis.sites) == 4  # q, v x 2 layers
    assert dt.list_deltas(model) == ["a", "b"]  # named sources stay
    for path, site in basis.sites.items():
        dense = [_lora_update(model, name, path) for name in ("a", "b")]
        E_out, _ = _top_eigenvectors(sum(d @ d.T for d in dense), 4)
        E_in, _ = _top_eigenvectors(sum(d.T @ d for d in dense), 4)
        torch.testing.assert_close(_projector(site.up[:, :4]), _projector(E_out), atol=1e-5, rtol=0)
        torch.testing.assert_close(_projector(site.down[:4].T), _projector(E_in), atol=1e-5, rtol=0)
        # the two random directions: orthonormal, and orthogonal to the principal ones
        torch.testing.assert_close(site.up.T @ site.up, torch.eye(6), **TOL)
        torch.testing.assert_close(site.down @ site.down.T, torch.eye(6), **TOL)


def _basis_file(tmp_path, seed: int = 0):
    model = _two_loras(seed)
    dt.save(model, tmp_path / "a", "a")
    dt.save(model, tmp_path / "b", "b")
    fresh = BERT.build(seed)
    basis = dt.eigen_basis(fresh, [tmp_path / "a", tmp_path / "b"], k=4, augment=1)
    assert not dt.list_deltas(fresh)  # the folders were loaded and removed again
    return dt.save_basis(basis, tmp_path / "basis.safetensors")


def test_training_changes_only_the_loadings(tmp_path):
    path = _basis_file(tmp_path)
    model = BERT.build(0)
    report = dt.attach(model, dt.EigenLoRAConfig(basis=str(path), k=5, r=2), name="new")
    assert len(report.sites) == 4 and report.trainable == 4 * 2 * 5 * 2  # 4 modules, L_B (5, 2) and L_A (2, 5)
    units = {p: model.get_submodule(p).deltas["new"] for p in model._deltatune_state.sites["new"]}
    saved = read_basis(path)
    for p, unit in units.items():  # the first k of the file's components, unchanged
        torch.testing.assert_close(unit.up_basis, saved.sites[p].up[:, :5], rtol=0, atol=0)
    bases = {p: (u.up_basis.clone(), u.down_basis.clone()) for p, u in units.items()}
    loadings = {k: p.detach().clone() for k, p in dt.delta_parameters(model, "new")}
    base = {k: p.detach().clone() for k, p in dt.base_parameters(model)}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        BERT.output(model).pow(2).mean().backward()
        optimizer.step()
    for p, unit in units.items():
        assert torch.equal(unit.up_basis, bases[p][0]) and torch.equal(unit.down_basis, bases[p][1])
    assert all(torch.equal(p, base[k]) for k, p in dt.base_parameters(model))
    assert all(not torch.equal(p, loadings[k]) for k, p in dt.delta_parameters(model, "new"))


def test_saved_delta_loads_without_its_basis_file(tmp_path):
    path = _basis_file(tmp_path)
    sha = __import__("hashlib").sha256(path.read_bytes()).hexdigest()
    model = BERT.build(0)
    dt.attach(model, dt.EigenLoRAConfig(basis=str(path), k=5, r=2), name="new")
    with torch.no_grad():
        for _, param in dt.delta_parameters(model, "new"):
            param.add_(0.1 * torch.randn(param.shape))
    expected = BERT.output(model)
    dt.save(model, tmp_path / "new", "new")
    path.unlink()
    meta = json.loads((tmp_path / "new" / "delta.json").read_text())
    assert meta["config"]["basis"] == "" and meta["config"]["basis_sha256"] == sha
    assert meta["num_parameters"] == 4 * (32 * 5 + 5 * 32 + 5 * 2 + 2 * 5)  # per module: up, down, L_B, L_A
    fresh = BERT.build(0)
    dt.load(fresh, tmp_path / "new")
    torch.testing.assert_close(BERT.output(fresh), expected, rtol=0, atol=0)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_a_basis_of_the_float_base_fits_its_bf16_and_int8_copies(tmp_path, precision):
    from deltatune.models.quantize import quantize_model

    path = _basis_file(tmp_path)
    model = BERT.build(0)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    else:
        quantize_model(model, "int8")
    report = dt.attach(model, dt.EigenLoRAConfig(basis=str(path), k=5, r=2), name="new")
    assert len(report.sites) == 4


def test_mixed_batch_rows_equal_each_delta_alone(tmp_path):
    path = _basis_file(tmp_path)
    model = BERT.build(0)
    dt.attach(model, dt.EigenLoRAConfig(basis=str(path), k=5, r=2), name="x")
    dt.attach(model, dt.EigenLoRAConfig(k=3, r=4), name="y")  # no basis: random components, another rank
    with torch.no_grad():
        for name in ("x", "y"):
            for _, param in dt.delta_parameters(model, name):
                param.add_(0.2 * torch.randn(param.shape))
    assert_rows_equal_alone(BERT, model, ["x", None, "y"], BERT.inputs())


def test_sources_of_another_base_are_refused(tmp_path):
    model = _two_loras(seed=0)
    dt.save(model, tmp_path / "a", "a")
    other = _two_loras(seed=1)
    dt.save(other, tmp_path / "b", "b")
    base = BERT.build(0)
    with pytest.raises(dt.FingerprintError, match=r"must all be deltas of this base; .*b: .*another base"):
        dt.eigen_basis(base, [tmp_path / "a", tmp_path / "b"], k=2)
    assert not dt.list_deltas(base)


def test_a_delta_with_no_low_rank_update_is_refused():
    model = _two_loras()
    dt.attach(model, dt.IA3Config(), name="scales")
    with pytest.raises(dt.NotApplicableError, match=r"delta 'scales' \(ia3\) has no low-rank update at"):
        dt.eigen_basis(model, ["a", "scales"], k=2)


def test_deltas_on_different_modules_are_refused():
    model = _two_loras()
    some = sorted(model._deltatune_state.sites["a"])[:1]
    dt.attach(model, dt.LoRAConfig(r=2, targets=["re:" + p.replace(".", r"\.") for p in some]), name="c")
    with pytest.raises(dt.TargetError, match=r"sources adapt different modules"):
        dt.eigen_basis(model, ["a", "c"], k=2)


def test_bad_counts_are_refused():
    model = _two_loras()
    with pytest.raises(dt.ConfigError, match="two or more source deltas"):
        dt.eigen_basis(model, ["a"], k=2)
    with pytest.raises(dt.NotApplicableError, match=r"k=7 exceeds the 6 directions"):
        dt.eigen_basis(model, ["a", "b"], k=7)  # two deltas of rank 3


def test_attach_refuses_a_missing_file_another_base_and_too_large_k(tmp_path):
    with pytest.raises(dt.ConfigError, match=r"basis file .* not found; build one .*deltatune eigenbasis"):
        dt.attach(BERT.build(0), dt.EigenLoRAConfig(basis=str(tmp_path / "none.safetensors")))
    path = _basis_file(tmp_path)
    other = BERT.build(1)
    with pytest.raises(dt.FingerprintError, match=r"was built on another base"):
        dt.attach(other, dt.EigenLoRAConfig(basis=str(path), k=5))
    model = BERT.build(0)
    with pytest.raises(dt.NotApplicableError, match=r"k=6 exceeds the 5 components .*\(4 principal \+ 1 random\)"):
        dt.attach(model, dt.EigenLoRAConfig(basis=str(path), k=6))
    assert not dt.list_deltas(model) and not dt.list_deltas(other)


def test_eigenbasis_and_train_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    from deltatune.cli import main

    sources = []
    for seed in (0, 1):
        flags = ["--method", "lora", "--r", "2", "--seed", str(seed), "--lr", "5e-2"]
        out = train_from_the_command_line(tmp_path / f"s{seed}", tiny_bert, reviews_csv, flags, steps=3)
        sources.append(str(out))
    basis = tmp_path / "basis.safetensors"
    assert main(["eigenbasis", *sources, "--model", str(tiny_bert), "--k", "3", "--augment", "1",
                 "--out", str(basis)]) == 0
    run = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv,
                                      ["--method", "eigenlora", "--basis", str(basis), "--k", "4", "--r", "2"], steps=3)
    meta = json.loads((run / "delta.json").read_text())
    assert meta["config"]["basis"] == "" and meta["config"]["k"] == 4
    assert len(meta["sites"]) == len(read_basis(basis).sites)
