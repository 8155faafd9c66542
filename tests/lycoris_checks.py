"""Checks shared by the LoHa and LoKr tests: a model with one Linear and one GPT-2 Conv1D,
random delta tensors, the mixed-batch and merging contracts, and both directions of peft interop."""

from __future__ import annotations

import warnings

import torch
from torch import nn
from tiny_models import MODELS, small_config

import deltatune as dt
from deltatune.interop import export_peft, import_peft

TOL = 1e-5


class LinearAndConv1D(nn.Module):
    """``x -> Conv1D(Linear(x))``: one module of each layout, widths with several factorisations."""

    def __init__(self, fan_in: int = 12, hidden: int = 18, fan_out: int = 8) -> None:
        from transformers.pytorch_utils import Conv1D

        super().__init__()
        self.linear = nn.Linear(fan_in, hidden)
        self.conv = Conv1D(fan_out, hidden)  # GPT-2 layout: weight (in, out)

    def forward(self, x):
        return self.conv(self.linear(x))


def randomise(params, seed: int = 7, scale: float = 0.3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in params:
            param.add_(scale * torch.randn(param.shape, generator=generator))


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def unit_output(model, unit, module, x, weight_change):
    """The unit's unmerged output, ``x (W + weight_change)^T + b`` (the reference) and the base output."""
    weight = module.weight.T if getattr(unit, "transposed", False) else module.weight
    reference = torch.nn.functional.linear(x, weight + weight_change, module.bias)
    with dt.base_only(model):
        base = module(x)
    return unit.forward_post(module, (x,), {}, base), reference, base


def copy_into_peft(model, name, peft_model) -> None:
    """Random values for the delta ``name``, copied in order into ``peft_model``'s adapter tensors."""
    ours = [p for _, p in dt.delta_parameters(model, name)]
    randomise(ours)
    theirs = [p for _, p in peft_model.named_parameters() if p.requires_grad]
    assert [p.shape for p in ours] == [p.shape for p in theirs]
    with torch.no_grad():
        for mine, their in zip(ours, theirs):
            their.copy_(mine)


def assert_rows_equal_alone(case_name: str, configs: dict, rows: list) -> None:
    """Rows routed to ``configs``' deltas (and ``None``: the base) equal each row run alone."""
    case = MODELS[case_name]
    model = case.build()
    for i, (name, fields) in enumerate(configs.items()):
        method = fields.pop("method")
        dt.attach(model, small_config(method, case, **fields), name=name)
        randomise([p for _, p in dt.delta_parameters(model, name)], seed=i + 1)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (len(rows), 6), generator=generator)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    with torch.no_grad(), dt.route(model, rows):
        mixed = case.output(model, inputs)
    with torch.no_grad():
        for i, name in enumerate(rows):
            with dt.using(model, (name,) if name else ()):
                alone = case.output(model, {k: v[i:i + 1] for k, v in inputs.items()})[0]
            torch.testing.assert_close(mixed[i], alone, rtol=TOL, atol=TOL, msg=lambda m, i=i: f"row {i}: {m}")


def assert_linear_merge_is_the_dense_sum(tmp_path, configs: list) -> None:
    """``merge_deltas(..., "linear", weights)`` of two deltas equals the base plus the weighted
    sum of their units' own weight changes, added by hand."""
    case = MODELS["llama"]
    folders, changes = [], {}
    weights = (0.7, -0.4)
    for i, config in enumerate(configs):
        model = case.build()
        dt.attach(model, config, name=f"d{i}")
        randomise([p for _, p in dt.delta_parameters(model, f"d{i}")], seed=10 + i)
        for path, module in model.named_modules():
            slot = getattr(module, "deltas", None)
            if slot is not None and f"d{i}" in slot:
                change = slot[f"d{i}"].delta_weight().detach()
                changes[path] = changes.get(path, 0) + weights[i] * change
        folders.append(dt.save(model, tmp_path / f"d{i}"))
    reference = case.build()
    with torch.no_grad():
        for path, change in changes.items():
            reference.get_submodule(path).weight.add_(change)
    model = case.build()
    dt.merge_deltas(model, folders, "linear", weights=list(weights))
    with torch.no_grad():
        torch.testing.assert_close(case.output(model), case.output(reference), rtol=TOL, atol=TOL)


def _outputs(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def assert_export_loads_in_peft(tmp_path, case_name: str, config) -> float:
    """A deltatune delta with random tensors, exported, gives the same logits in peft; the
    largest difference is returned."""
    case = MODELS[case_name]
    ours = case.build(0)
    dt.attach(ours, config, name="x")
    randomise([p for _, p in dt.delta_parameters(ours, "x")])
    ours.eval()
    dt.save(ours, tmp_path / "delta")
    export_peft(tmp_path / "delta", tmp_path / "peft", case.build(0))
    peft = __import__("peft")
    theirs = quiet(peft.PeftModel.from_pretrained, case.build(0), tmp_path / "peft").eval()
    inputs = case.inputs()
    mine, their = _outputs(ours, inputs), _outputs(theirs, inputs)
    base = _outputs(case.build(0), inputs)
    assert (mine - base).abs().max() > 100 * TOL, "the delta changes nothing"
    torch.testing.assert_close(mine, their, rtol=0, atol=TOL)
    return (mine - their).abs().max().item()


def assert_peft_adapter_imports(tmp_path, case_name: str, peft_config) -> float:
    """A peft adapter with random tensors, saved by peft and imported, gives peft's logits; the
    largest difference is returned."""
    case = MODELS[case_name]
    peft = __import__("peft")
    theirs = quiet(peft.get_peft_model, case.build(0), peft_config).eval()
    randomise([p for _, p in theirs.named_parameters() if p.requires_grad])
    quiet(theirs.save_pretrained, tmp_path / "peft")
    import_peft(tmp_path / "peft", tmp_path / "delta", case.build(0))
    ours = case.build(0)
    dt.load(ours, tmp_path / "delta")
    ours.eval()
    inputs = case.inputs()
    mine, their = _outputs(ours, inputs), _outputs(theirs, inputs)
    assert (their - _outputs(case.build(0), inputs)).abs().max() > 100 * TOL, "the adapter changes nothing"
    torch.testing.assert_close(mine, their, rtol=0, atol=TOL)
    return (mine - their).abs().max().item()


def peft_trainable(case_name: str, peft_config) -> int:
    peft = __import__("peft")
    return quiet(peft.get_peft_model, MODELS[case_name].build(0), peft_config).get_nb_trainable_parameters()[0]
