"""A bfloat16 frozen base: every delta keeps float32 parameters (the optimizer's master copy),
the model computes in bfloat16, and ``--dtype bf16`` trains from the command line."""

from __future__ import annotations

import json

import pytest
import torch

import deltatune as dt
from deltatune.train.job import TrainJob
from method_checks import train_from_the_command_line
from tiny_models import MODELS, small_config

METHODS = [m for m in dt.method_names() if not dt.get_method(m).fuses and not dt.get_method(m).trains_base]
CASES = [(method, model) for method in METHODS for model in ("llama", "bert")]


@pytest.mark.parametrize("method,model_name", CASES)
def test_float32_delta_on_a_bfloat16_base(method, model_name, tmp_path):
    case = MODELS[model_name]
    with torch.no_grad():
        base_output = case.output(case.build().to(torch.bfloat16))
    model = case.build().to(torch.bfloat16)
    try:
        dt.attach(model, small_config(method, case), name="t")
    except dt.NotApplicableError as error:
        pytest.skip(f"{method} does not apply to {model_name}: {error}")
    assert {p.dtype for _, p in dt.delta_parameters(model, "t")} == {torch.float32}
    with torch.no_grad():
        output = case.output(model)
    assert output.dtype == torch.bfloat16
    if dt.get_method(method).identity_at_init:
        torch.testing.assert_close(output, base_output, rtol=0, atol=0)
    model.train()
    case.output(model).float().pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in dt.delta_parameters(model, "t"))
    model.eval()
    dt.save(model, tmp_path / "d")
    fresh = case.build().to(torch.bfloat16)
    dt.load(fresh, tmp_path / "d")
    with torch.no_grad():
        torch.testing.assert_close(case.output(fresh), case.output(model), rtol=0, atol=0)


def test_dtype_flag_is_checked():
    with pytest.raises(dt.DeltaError, match="unknown --dtype 'fp16'; choose one of fp32, bf16"):
        TrainJob(dtype="fp16")
    with pytest.raises(dt.ConfigError, match="method 'full' trains the base itself"):
        TrainJob(method="full", dtype="bf16")


def test_train_with_a_bfloat16_base_from_the_command_line(tmp_path, tiny_bert, reviews_csv):
    out = train_from_the_command_line(tmp_path, tiny_bert, reviews_csv, ["--method", "lora", "--dtype", "bf16"], steps=3)
    meta = json.loads((out / "delta.json").read_text())
    assert meta["base"]["precision"]["dtype"] == "bfloat16"
    assert {t["dtype"] for t in meta["tensors"].values()} == {"float32"}  # the head too: float32 masters
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["test"]["accuracy"] <= 1
