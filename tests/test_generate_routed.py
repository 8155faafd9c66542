"""``model.generate(..., delta_ids=...)``: each prompt decodes through its own delta, as
``model(..., delta_ids=...)`` does for one forward pass.

Reference: each prompt generated alone with its delta active (``using``) or the base alone.
"""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import DeltaStateError
from tiny_models import MODELS


def _model():
    model = MODELS["llama"].build()
    model.generation_config.pad_token_id = 0
    for name, seed in (("a", 1), ("b", 2)):
        dt.attach(model, dt.LoRAConfig(r=4, targets=["q_proj", "v_proj", "down_proj"]), name=name)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, p in dt.delta_parameters(model, name):
                p.add_(0.5 * torch.randn(p.shape, generator=generator))
    return model


PROMPTS = torch.tensor([[5, 9, 13, 2], [7, 3, 3, 8], [11, 12, 1, 4]])
ROWS = ["a", None, "b"]


def _alone(model, row: int, delta, **options) -> torch.Tensor:
    with dt.using(model, delta):
        return model.generate(input_ids=PROMPTS[row: row + 1], attention_mask=torch.ones(1, 4, dtype=torch.long),
                              do_sample=False, max_new_tokens=6, **options)


def test_greedy_rows_equal_each_prompt_with_its_own_delta():
    model = _model()
    mixed = model.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False,
                           max_new_tokens=6, delta_ids=ROWS)
    for row, delta in enumerate(ROWS):
        assert torch.equal(mixed[row], _alone(model, row, delta)[0]), f"row {row} ({delta})"
    # the deltas matter: the base row differs from what delta 'a' makes of the same prompt
    assert not torch.equal(_alone(model, 0, None)[0], mixed[0])


def test_beams_repeat_the_routing_per_prompt():
    model = _model()
    mixed = model.generate(input_ids=PROMPTS, attention_mask=torch.ones_like(PROMPTS), do_sample=False,
                           max_new_tokens=5, num_beams=2, num_return_sequences=2, delta_ids=ROWS)
    assert mixed.shape[0] == 6
    for row, delta in enumerate(ROWS):
        alone = _alone(model, row, delta, num_beams=2, num_return_sequences=2)
        # the same two beams; their order may swap where two scores tie to rounding
        width = min(alone.shape[1], mixed.shape[1])
        assert sorted(map(tuple, mixed[2 * row: 2 * row + 2, :width].tolist())) == \
            sorted(map(tuple, alone[:, :width].tolist())), f"row {row} ({delta})"


def test_integer_ids_and_plan_restored_after_generate():
    model = _model()
    dt.set_active(model, "b")
    by_name = model.generate(input_ids=PROMPTS, do_sample=False, max_new_tokens=4, delta_ids=ROWS)
    by_index = model.generate(input_ids=PROMPTS, do_sample=False, max_new_tokens=4, delta_ids=[0, -1, 1])
    assert torch.equal(by_name, by_index)
    assert dt.active_deltas(model) == ("b",) and dt.get_routing(model) is None


def test_wrong_row_count_is_refused_before_decoding():
    model = _model()
    with pytest.raises(DeltaStateError, match="delta_ids gives 2 rows but input_ids has a batch of 3"):
        model.generate(input_ids=PROMPTS, max_new_tokens=2, delta_ids=["a", "b"])


def test_generate_is_the_plain_method_again_after_the_last_delta_goes():
    model = _model()
    dt.delete(model, "a")
    dt.delete(model, "b")
    assert "generate" not in model.__dict__
