"""A slot serves its module through the module's ``forward`` (core.slot.SlotForward), and LoRA's
inference kernels write in place: what that changes must be invisible.

References: the module's own signature, the model before attach, the same call with grad
enabled (the out-of-place kernels), each row run alone, and the merged model.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from torch import nn

import deltatune as dt
from deltatune.core.slot import SlotForward
from tiny_models import MODELS, small_config

TOL = {"atol": 1e-5, "rtol": 1e-5}


def _lora(case_name: str, names=("a",), r: int = 4):
    case = MODELS[case_name]
    model = case.build().eval()
    generator = torch.Generator().manual_seed(3)
    for name in names:
        dt.attach(model, small_config("lora", case, r=r), name=name)
        with torch.no_grad():
            for _, p in dt.delta_parameters(model, name):
                p.add_(0.3 * torch.randn(p.shape, generator=generator))
    return case, model


def _adapted(model) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), SlotForward)]


def test_adapted_modules_keep_their_class_signature_and_state_dict_names():
    case = MODELS["bert"]
    model = case.build()
    before = set(model.state_dict())
    dt.attach(model, small_config("lora", case, r=4), name="a")
    adapted = _adapted(model)
    assert adapted and all(type(m) is nn.Linear for m in adapted)
    for module in adapted:
        assert inspect.signature(module.forward) == inspect.signature(nn.Linear.forward.__get__(module))
        assert not module._forward_hooks and not module._forward_pre_hooks  # no hooks: torch's fast call path
    assert before <= set(model.state_dict())


def test_a_root_slot_keeps_the_model_signature_that_transformers_and_trainer_read():
    case = MODELS["bert"]
    model = case.build()
    own = inspect.signature(model.forward)
    dt.attach(model, small_config("prompt", case), name="p")
    assert isinstance(model.__dict__.get("forward"), SlotForward)
    assert inspect.signature(model.forward) == own
    assert "input_ids" in inspect.signature(model.forward).parameters


def test_deleting_the_last_delta_gives_the_module_back_its_own_forward():
    case, model = _lora("bert")
    adapted = _adapted(model)
    dt.delete(model, "a")
    assert all("forward" not in m.__dict__ for m in adapted)
    assert not _adapted(model)


def test_another_librarys_forward_wrapper_is_kept_called_and_restored():
    case = MODELS["bert"]
    model = case.build().eval()
    query = model.bert.encoder.layer[0].attention.self.query
    calls = []
    own = query.forward

    def wrapper(*args, **kwargs):  # what accelerate's hooks do
        calls.append(1)
        return own(*args, **kwargs)

    query.forward = wrapper
    dt.attach(model, small_config("lora", case, r=4, targets=["query"]), name="a")
    with torch.no_grad():
        case.output(model, case.inputs())
    assert calls, "the earlier wrapper must still run"
    dt.delete(model, "a")
    assert query.__dict__["forward"] is wrapper


def test_a_forward_hook_on_an_adapted_module_sees_the_adapted_output():
    case, model = _lora("bert")
    query = model.bert.encoder.layer[0].attention.self.query
    seen = []
    query.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    with torch.no_grad():
        case.output(model, case.inputs())
        adapted = seen[-1]
        dt.merge(model)
        case.output(model, case.inputs())
        merged = seen[-1]
    torch.testing.assert_close(adapted, merged, **TOL)


def test_a_deep_copy_runs_its_own_deltas():
    case, model = _lora("bert")
    twin = copy.deepcopy(model)
    inputs = case.inputs()
    with torch.no_grad():
        torch.testing.assert_close(case.output(twin, inputs), case.output(model, inputs), rtol=0, atol=0)
        for _, p in dt.delta_parameters(twin, "a"):
            p.zero_()
        assert not torch.equal(case.output(twin, inputs), case.output(model, inputs))
        for module in _adapted(twin):
            assert module.__dict__["forward"].module is module


@pytest.mark.parametrize("case_name", ["bert", "gpt2", "llama"])
def test_lora_inference_in_place_equals_the_training_kernel(case_name):
    # gpt2: Conv1D (weights stored transposed); the in-place kernel runs only without grad
    case, model = _lora(case_name)
    inputs = case.inputs()
    with torch.no_grad():
        in_place = case.output(model, inputs)
    with torch.enable_grad():
        out_of_place = case.output(model, inputs).detach()
    torch.testing.assert_close(in_place, out_of_place, **TOL)
    with torch.no_grad():
        dt.merge(model)
        torch.testing.assert_close(case.output(model, inputs), in_place, **TOL)


def test_lora_inference_follows_a_change_of_B():
    case, model = _lora("bert")
    inputs = case.inputs()
    with torch.no_grad():
        first = case.output(model, inputs)
        for name, p in dt.delta_parameters(model, "a"):
            if name.endswith("lora_B"):
                p.mul_(2.0)  # the cached B^T must be rebuilt
        second = case.output(model, inputs)
    with torch.enable_grad():
        reference = case.output(model, inputs).detach()
    assert not torch.allclose(first, second)
    torch.testing.assert_close(second, reference, **TOL)


@pytest.mark.parametrize("case_name", ["bert", "gpt2"])
def test_mixed_lora_rows_in_place_equal_each_row_alone_and_the_grad_kernel(case_name):
    case, model = _lora(case_name, names=("a", "b", "c"))
    inputs = {k: v.repeat(2, 1) if v.shape[0] == 3 else v for k, v in case.inputs().items()}
    rows = ["a", "b", None, "c", "a", "b"]
    with torch.no_grad():
        mixed = case.output(model, inputs | {"delta_ids": rows})
        for i, name in enumerate(rows):
            one = {k: v[i:i + 1] for k, v in inputs.items()}
            if name is None:
                with dt.base_only(model):
                    alone = case.output(model, one)
            else:
                with dt.using(model, name):
                    alone = case.output(model, one)
            torch.testing.assert_close(mixed[i], alone[0], **TOL)
    with torch.enable_grad():
        torch.testing.assert_close(case.output(model, inputs | {"delta_ids": rows}).detach(), mixed, **TOL)
