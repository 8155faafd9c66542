"""Gradient checkpointing with deltas: a checkpointed block runs again in the backward pass, and
that recompute must run the same deltas as its forward did (``core/recompute.py``).

Every method's gradients with checkpointing equal those without it, exactly; so do a mixed
batch's (whose per-row routing has ended before ``backward``), a training run's delta, and a
``train --multi`` run's deltas.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import CheckpointError, checkpoint

import deltatune as dt
from deltatune.train.batches import Encoded
from deltatune.train.loop import Settings, train
from deltatune.train.multi import Task, train_tasks
from method_checks import train_from_the_command_line
from tiny_models import MODELS, HomemadeTransformer, small_config

METHODS = [m for m in dt.method_names() if not dt.get_method(m).fuses and not dt.get_method(m).trains_base]


def _perturbed(model, names, seed: int = 3) -> None:
    """Deltas that change the output (many start as the identity, with zero gradients somewhere)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for _, param in dt.delta_parameters(model, name):
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


def _gradients(model, names) -> dict[str, torch.Tensor]:
    return {f"{name}.{key}": param.grad.clone() for name in names for key, param in dt.delta_parameters(model, name)
            if param.grad is not None}


def _assert_same(expected: dict, got: dict) -> None:
    assert expected and expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def _llama_with(method: str, checkpointing: bool):
    case = MODELS["llama"]
    model = case.build()
    try:
        dt.attach(model, small_config(method, case), name="t")
    except dt.NotApplicableError as error:
        pytest.skip(f"{method} does not apply to a Llama: {error}")
    _perturbed(model, ["t"])
    if checkpointing:
        dt.enable_gradient_checkpointing(model)
    return case, model.train()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_the_same_gradients_with_checkpointing(method):
    grads = []
    for checkpointing in (False, True):
        case, model = _llama_with(method, checkpointing)
        loss = case.output(model).pow(2).mean()
        extra = dt.loss_terms(model)  # a router's balancing loss, an orthogonality penalty
        (loss if extra is None else loss + extra).backward()
        grads.append(_gradients(model, ["t"]))
    _assert_same(*grads)


def _two_loras(checkpointing: str | None, active: str | None = None):
    model = MODELS["llama"].build()
    for name in ("a", "b"):
        dt.attach(model, dt.LoRAConfig(r=4), name=name)
    _perturbed(model, ["a", "b"])
    dt.set_trainable(model, ["a", "b"])
    if active is not None:
        dt.set_active(model, active)
    if checkpointing == "deltatune":
        dt.enable_gradient_checkpointing(model)
    elif checkpointing == "plain":  # transformers' own, without the plan kept for the recompute
        model.activation_checkpointing_enable()
    return model.train()


def _mixed_batch_gradients(model, delta_ids=("a", "b", "a", None)) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 100, (4, 8), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=ids, delta_ids=list(delta_ids)).loss.backward()
    return _gradients(model, ["a", "b"])


def test_a_mixed_batch_recomputes_under_its_own_routing():
    _assert_same(_mixed_batch_gradients(_two_loras(None)), _mixed_batch_gradients(_two_loras("deltatune")))


def test_without_the_recompute_context_the_routing_is_gone():
    """Why the context exists: transformers' plain checkpointing recomputes after the row routing
    ended, through the active deltas; torch notices the different graph here and refuses."""
    with pytest.raises(CheckpointError, match="different number of tensors"):
        _mixed_batch_gradients(_two_loras("plain"))


def test_without_the_recompute_context_gradients_can_be_silently_wrong():
    """Every row routed to "a" while "b" is active: the plain recompute runs "b" in the same graph
    shape, torch cannot tell, and the gradients are wrong; with the context they are exact."""
    rows = ("a", "a", "a", "a")
    expected = _mixed_batch_gradients(_two_loras(None, active="b"), rows)
    _assert_same(expected, _mixed_batch_gradients(_two_loras("deltatune", active="b"), rows))
    plain = _mixed_batch_gradients(_two_loras("plain", active="b"), rows)
    assert max((plain[k] - expected[k]).abs().max().item() for k in expected) > 1e-2


def test_the_context_serves_torch_checkpoint_on_any_model():
    """A model without transformers' checkpointing: the user's own checkpoint calls take the
    context, and a mixed batch's gradients are the same as without checkpointing."""
    grads = []
    for use_checkpoint in (False, True):
        torch.manual_seed(0)
        model = HomemadeTransformer()
        for name in ("a", "b"):
            dt.attach(model, dt.LoRAConfig(r=2, target_types=("Linear",)), name=name)
        _perturbed(model, ["a", "b"])
        dt.set_trainable(model, ["a", "b"])
        if use_checkpoint:
            context = dt.recompute_context(model)
            for stage in model.stages:
                plain = stage.forward
                stage.forward = lambda x, run=plain: checkpoint(run, x, use_reentrant=False, context_fn=context)
        x = torch.randint(0, 50, (3, 5), generator=torch.Generator().manual_seed(2))
        with dt.route(model, ["a", "b", None]):
            loss = model(x).pow(2).mean()
        loss.backward()
        grads.append(_gradients(model, ["a", "b"]))
    _assert_same(*grads)


def test_a_model_without_checkpointing_is_told_what_to_do():
    with pytest.raises(dt.ConfigError, match=r"HomemadeTransformer has no gradient checkpointing of its own.*"
                                             r"context_fn=deltatune.recompute_context\(model\)"):
        dt.enable_gradient_checkpointing(HomemadeTransformer())


def test_disable_turns_the_recompute_off():
    """A block runs twice per step with checkpointing (forward, then its recompute), once after
    ``disable_gradient_checkpointing``; the gradients are the same either way."""
    torch.manual_seed(0)
    model = MODELS["llama"].build().train()
    dt.attach(model, dt.LoRAConfig(r=4), name="t")
    _perturbed(model, ["t"])
    calls = []
    mlp = model.model.layers[0].mlp  # inside the checkpointed block; counted in its forward (torch's recompute skips hooks)
    own = mlp.forward
    mlp.forward = lambda *args, **kwargs: calls.append(1) or own(*args, **kwargs)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(1))

    def step() -> tuple[int, dict]:
        calls.clear()
        model.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        return len(calls), _gradients(model, ["t"])

    dt.enable_gradient_checkpointing(model)
    on, with_recompute = step()
    dt.disable_gradient_checkpointing(model)
    off, without = step()
    assert (on, off) == (2, 1)
    _assert_same(with_recompute, without)
    dt.disable_gradient_checkpointing(HomemadeTransformer())  # no checkpointing of its own: nothing to undo


def _causal_data(rows: int = 12, seq: int = 8, seed: int = 0) -> Encoded:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 100, (rows, seq), generator=generator).tolist()
    return Encoded(input_ids=ids, labels=[list(row) for row in ids], task="causal_lm", pad_id=0)


def _trained_lora(checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS["llama"].build()
    dt.attach(model, dt.LoRAConfig(r=4), name="t")
    train(model, _causal_data(), Settings(steps=3, batch_size=4, lr=1e-2, progress=False,
                                          gradient_checkpointing=checkpointing))
    return {key: p.detach().clone() for key, p in dt.delta_parameters(model, "t")}


def test_a_training_run_trains_the_same_delta_with_checkpointing():
    _assert_same(_trained_lora(False), _trained_lora(True))


def _multi_trained(checkpointing: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MODELS["llama"].build()
    tasks = []
    for i, name in enumerate(("a", "b")):
        dt.attach(model, dt.LoRAConfig(r=4), name=name)
        tasks.append(Task(name=name, train=_causal_data(seed=i), rows_per_step=2))
    train_tasks(model, tasks, Settings(steps=3, lr=1e-2, progress=False, gradient_checkpointing=checkpointing))
    return {f"{n}.{key}": p.detach().clone() for n in ("a", "b") for key, p in dt.delta_parameters(model, n)}


def test_train_multi_trains_the_same_deltas_with_checkpointing():
    _assert_same(_multi_trained(False), _multi_trained(True))


def test_the_train_flag_checkpoints_and_trains_the_same_delta(tmp_path, tiny_bert, reviews_csv):
    from safetensors.torch import load_file

    import yaml

    runs = [train_from_the_command_line(tmp_path / flag, tiny_bert, reviews_csv, ["--method", "lora", *extra], steps=3)
            for flag, extra in (("plain", []), ("checkpointed", ["--gradient-checkpointing"]))]
    assert yaml.safe_load((runs[1] / "config.yaml").read_text())["gradient_checkpointing"] is True
    assert yaml.safe_load((runs[0] / "config.yaml").read_text())["gradient_checkpointing"] is False
    _assert_same(*(load_file(run / "delta.safetensors") for run in runs))
