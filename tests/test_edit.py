"""Model editing (ROME, MEMIT) as a LoRA delta, on tiny random Llama and GPT-2 models."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch

import deltatune as dt
from deltatune.editing import (EditSettings, Fact, KeyStatistics, edit_sites, load_facts, memit_factors, packaged_facts,
                            rome_factors, score_facts)
from deltatune.core.slot import get_state
from deltatune.editing import stats as stats_module
from deltatune.editing.rome import subject_key
from deltatune.editing.sites import default_layers
from deltatune.io.fingerprint import module_fingerprint
from deltatune.errors import ConfigError, EditError, TargetError

WORDS = ["good", "great", "fine", "love", "nice", "bad", "awful", "poor", "hate", "dull", "the", "movie", "film", "was",
         "very", "plot", "actors", "is", "a", "what", "why", "yes", "no"]
TEXTS = [" ".join(random.Random(i).choices(WORDS, k=6 + i % 5)) for i in range(150)]  # about 1,200 tokens
FACT = Fact("movie", "the {} was", "great", paraphrases=("what a {} is",), neighbourhood=("the plot was", "the film was"))
FAST = EditSettings(steps=40, lr=3.0, clamp=20.0, weight_decay=0.0, min_probability=0.05,
                    mom2_weight=1.0)  # a random model is hard to move


def _random_spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3 * n, generator=g, dtype=torch.float64)
    return x @ x.T / (3 * n)


@pytest.fixture(scope="module")
def llama_folder(tiny_llama, tmp_path_factory):
    """conftest's tiny Llama with weights drawn at std 0.3: at the default 0.02 a two-block random
    model's next-token distribution is nearly uniform whatever a layer adds, so no edit can take."""
    import transformers

    folder = tmp_path_factory.mktemp("edit-llama")
    config = transformers.LlamaConfig.from_pretrained(tiny_llama)
    config.initializer_range, config.num_hidden_layers = 0.3, 4  # an edit acts through the blocks after it
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(llama_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_folder), AutoTokenizer.from_pretrained(llama_folder)


@pytest.fixture()
def fresh_llama(llama_folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(llama_folder), AutoTokenizer.from_pretrained(llama_folder)


@pytest.fixture()
def gpt2(llama_folder):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(llama_folder)
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, initializer_range=0.3)
    return transformers.GPT2LMHeadModel(config), tokenizer


@pytest.fixture()
def stats(tmp_path):
    return KeyStatistics(tokens=500, corpus="test-texts", texts=TEXTS, folder=tmp_path / "stats")


# ---- closed forms against naive references


def test_rome_factors_solve_the_constrained_least_squares():
    """ΔW minimises tr(ΔW C ΔWᵀ) subject to (W + ΔW) k = W k + r: each row solved from its KKT system."""
    out_dim, in_dim = 4, 6
    C, k, r = _random_spd(in_dim, 1), torch.randn(in_dim, dtype=torch.float64), torch.randn(out_dim, dtype=torch.float64)
    B, A = rome_factors(C, k, r)
    # per row i: minimise d C dᵀ subject to d·k = r_i  ->  [2C k; kᵀ 0] [d; μ] = [0; r_i]
    system = torch.zeros(in_dim + 1, in_dim + 1, dtype=torch.float64)
    system[:in_dim, :in_dim], system[:in_dim, in_dim], system[in_dim, :in_dim] = 2 * C, k, k
    rows = [torch.linalg.solve(system, torch.cat([torch.zeros(in_dim, dtype=torch.float64), r[i:i + 1]]))[:in_dim]
            for i in range(out_dim)]
    torch.testing.assert_close(B @ A, torch.stack(rows), rtol=1e-9, atol=1e-12)
    assert B.shape == (out_dim, 1) and A.shape == (1, in_dim)


def test_rome_update_writes_the_value_and_spares_keys_orthogonal_in_the_c_metric():
    W = torch.randn(5, 7, dtype=torch.float64)
    C, k, v = _random_spd(7, 2), torch.randn(7, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    B, A = rome_factors(C, k, v - W @ k)
    edited = W + B @ A
    torch.testing.assert_close(edited @ k, v, rtol=1e-10, atol=1e-10)
    u = torch.linalg.solve(C, k)  # keys with uᵀ k' = 0 keep their outputs
    other = torch.randn(7, dtype=torch.float64)
    other = other - (u @ other) / (u @ u) * u
    torch.testing.assert_close(edited @ other, W @ other, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(edited @ torch.randn(7, dtype=torch.float64), W @ torch.randn(7, dtype=torch.float64))


def test_memit_factors_equal_the_direct_formula():
    C, lam = _random_spd(6, 3), 7.0
    K, R = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    B, A = memit_factors(C, K, R, lam)
    direct = R.T @ K @ torch.linalg.inv(lam * C + K.T @ K)
    torch.testing.assert_close(B @ A, direct, rtol=1e-9, atol=1e-12)
    assert (B.shape, A.shape) == ((4, 3), (3, 6))


def test_memit_with_one_fact_is_rome_scaled_by_q_over_lambda_plus_q():
    """Sherman–Morrison: r kᵀ(λC + kkᵀ)⁻¹ = r (C⁻¹k)ᵀ / (λ + q), q = kᵀC⁻¹k; ROME divides by q."""
    C, k, r = _random_spd(6, 4), torch.randn(6, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    q = float(k @ torch.linalg.solve(C, k))
    for lam in (1e-3, 1.0, 50.0):
        B, A = memit_factors(C, k[None], r[None], lam)
        rb, ra = rome_factors(C, k, r)
        torch.testing.assert_close(B @ A * (lam + q) / q, rb @ ra, rtol=1e-9, atol=1e-12)


# ---- key statistics


def test_second_moment_equals_the_mean_outer_product_of_the_layer_inputs(llama, stats):
    model, tokenizer = llama
    site = edit_sites(model)[1]
    moment = stats.second_moments(model, tokenizer, [site.path])[site.path]
    keys, count = [], 0  # naive: one text at a time, all its positions, until 500 tokens
    module = model.get_submodule(site.path)
    handle = module.register_forward_pre_hook(lambda m, args: keys.append(args[0][0].detach().double()))
    with torch.no_grad():
        for text in TEXTS:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"][:500 - count]
            if not ids:
                break
            model(input_ids=torch.tensor([ids]))
            count += len(ids)
    handle.remove()
    K = torch.cat(keys)
    assert K.shape[0] == 500
    torch.testing.assert_close(moment, K.T @ K / 500, rtol=1e-5, atol=1e-6 * float(moment.abs().max()))


def test_key_statistics_are_cached_and_reused(llama, tmp_path):
    model, tokenizer = llama
    path = edit_sites(model)[0].path
    first = KeyStatistics(tokens=300, corpus="t", texts=TEXTS, folder=tmp_path)
    a = first.second_moments(model, tokenizer, [path])[path]
    assert first.computed == [path] and first.path(module_fingerprint(model), path).is_file()
    second = KeyStatistics(tokens=300, corpus="t", texts=["never read"], folder=tmp_path)
    b = second.second_moments(model, tokenizer, [path])[path]
    assert second.computed == [] and torch.equal(a, b)
    third = KeyStatistics(tokens=200, corpus="t", texts=TEXTS, folder=tmp_path)  # another sample count: its own entry
    third.second_moments(model, tokenizer, [path])
    assert third.computed == [path]


# ---- ROME and MEMIT on models


def test_rome_edit_is_a_rank_one_lora_reproducing_the_update(fresh_llama, stats):
    model, tokenizer = fresh_llama
    before = score_facts(model, tokenizer, [FACT])
    report = dt.edit(model, tokenizer, FACT, method="rome", layers=[1], stats=stats, settings=FAST, name="fix")
    (update,) = report.updates
    unit = dt.get_config(model, "fix")
    assert unit.r == 1 and update.rank == 1
    slot_unit = model.get_submodule(update.site.path).deltas["fix"]
    torch.testing.assert_close(slot_unit.delta_weight().double(), update.delta_weight, rtol=1e-6, atol=1e-7)
    after = score_facts(model, tokenizer, [FACT])
    assert after.efficacy_probability > before.efficacy_probability


def test_rome_edited_layer_maps_the_key_to_the_value_on_gpt2_conv1d(gpt2, stats):
    model, tokenizer = gpt2
    site = edit_sites(model)[0]
    assert site.fan_in_fan_out
    key = subject_key(model, tokenizer, FACT, site).float()
    module = model.get_submodule(site.path)
    with torch.no_grad():
        output_before = module(key[None]).double()[0]
    report = dt.edit(model, tokenizer, FACT, layers=[0], stats=stats, settings=FAST)
    with torch.no_grad():
        output_after = module(key[None]).double()[0]  # the LoRA is active on the module
    torch.testing.assert_close(output_after - output_before, report.values[0].delta, rtol=1e-4, atol=1e-5)


def test_merge_then_unmerge_restores_the_base_bit_for_bit(fresh_llama, stats):
    model, tokenizer = fresh_llama
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    dt.edit(model, tokenizer, FACT, layers=[0], stats=stats, settings=FAST, name="e")
    ids = torch.tensor([tokenizer(FACT.text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        dt.merge(model, "e")
        merged = model(input_ids=ids).logits
        dt.unmerge(model)
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-5)
    for key, value in originals.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_saved_edit_loads_onto_a_fresh_base_with_the_same_outputs(fresh_llama, stats, llama_folder, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = fresh_llama
    report = dt.edit(model, tokenizer, FACT, layers=[1], stats=stats, settings=FAST, name="e")
    dt.save(model, tmp_path / "e", provenance=report.provenance())
    fresh = AutoModelForCausalLM.from_pretrained(llama_folder)
    dt.load(fresh, tmp_path / "e")
    ids = torch.tensor([tokenizer(FACT.text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits, model(input_ids=ids).logits)
    meta = dt.read_meta(tmp_path / "e")
    assert meta["provenance"]["edit"]["facts"][0]["target"] == "great" and meta["method"] == "lora"


def test_memit_spreads_a_batch_over_layers_leaving_the_base_unchanged(fresh_llama, stats):
    model, tokenizer = fresh_llama
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    facts = [FACT, Fact("plot", "the {} was", "awful")]
    report = dt.edit(model, tokenizer, facts, method="memit", layers=[0, 1], stats=stats, settings=FAST, name="m")
    assert [u.rank for u in report.updates] == [2, 2] and report.layers == [0, 1]
    for update in report.updates:
        unit = model.get_submodule(update.site.path).deltas["m"]
        torch.testing.assert_close(unit.delta_weight().double(), update.delta_weight, rtol=1e-6, atol=1e-7)
    with dt.base_only(model):
        for key, value in originals.items():
            assert torch.equal(model.state_dict()[key], value), key
    scores = score_facts(model, tokenizer, facts)
    with dt.base_only(model):
        base = score_facts(model, tokenizer, facts)
    assert scores.efficacy_probability > base.efficacy_probability


def test_memit_on_gpt2_conv1d_restores_the_stored_in_out_weights(gpt2, stats):
    model, tokenizer = gpt2
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    report = dt.edit(model, tokenizer, [FACT, Fact("plot", "the {} was", "awful")], method="memit", layers=[0, 1],
                     stats=stats, settings=dataclasses.replace(FAST, min_probability=0.0), name="m")
    for update in report.updates:
        assert update.site.fan_in_fan_out
        unit = model.get_submodule(update.site.path).deltas["m"]
        torch.testing.assert_close(unit.delta_weight().double(), update.delta_weight, rtol=1e-6, atol=1e-7)
    with dt.base_only(model):
        assert all(torch.equal(model.state_dict()[k], v) for k, v in originals.items())


def test_memit_with_one_fact_one_layer_matches_rome_up_to_the_lambda_scale(fresh_llama, stats):
    model, tokenizer = fresh_llama
    settings = EditSettings(steps=5, lr=0.5, min_probability=0.0, mom2_weight=3.0)
    rome = dt.edit(model, tokenizer, FACT, method="rome", layers=[1], stats=stats, settings=settings, name="r")
    dt.delete(model, "r")
    memit = dt.edit(model, tokenizer, [FACT], method="memit", layers=[1], stats=stats, settings=settings, name="m")
    site = rome.updates[0].site
    C = stats.second_moments(model, tokenizer, [site.path])[site.path]
    with dt.base_only(model):
        k = subject_key(model, tokenizer, FACT, site)
    q = float(k @ torch.linalg.solve(C, k))
    torch.testing.assert_close(memit.updates[0].delta_weight * (3.0 + q) / q, rome.updates[0].delta_weight,
                               rtol=1e-5, atol=1e-8)


# ---- bad input


def test_default_layers_end_a_fifth_of_the_way_in_and_never_at_the_final_block(llama):
    model, _ = llama
    assert default_layers(model, 1) == [1] and default_layers(model, 5) == [0, 1, 2]


def test_a_template_without_slot_naming_the_subject_suggests_the_template():
    with pytest.raises(ConfigError, match=r"no '\{\}' slot.*'the \{\} was'"):
        Fact("movie", "the movie was", "great")


def test_a_subject_not_in_the_prompt_is_an_error_naming_the_fix():
    with pytest.raises(ConfigError, match="'film' is not in the prompt.*template with \\{\\}"):
        Fact("film", "the movie was", "great")
    with pytest.raises(ConfigError, match="2 '\\{\\}' slots"):
        Fact("movie", "the {} was {}", "great")
    with pytest.raises(ConfigError, match="paraphrase|not in the prompt"):
        Fact("movie", "the {} was", "great", paraphrases=("no slot here",))


def test_an_unknown_layer_names_the_range(llama, stats):
    model, tokenizer = llama
    with pytest.raises(TargetError, match=r"layer 7 is not a block.*\(0\.\.3\)"):
        dt.edit(model, tokenizer, FACT, layers=[7], stats=stats)
    assert get_state(model) is None


def test_an_edit_that_does_not_converge_raises_and_attaches_nothing(fresh_llama, stats):
    model, tokenizer = fresh_llama
    hopeless = EditSettings(steps=1, lr=1e-6, min_probability=0.9, stop_probability=0.99)
    with pytest.raises(EditError, match="did not converge.*nothing was written.*more steps"):
        dt.edit(model, tokenizer, FACT, layers=[0], stats=stats, settings=hopeless)
    assert get_state(model) is None


def test_rome_with_several_facts_points_to_memit(llama, stats):
    model, tokenizer = llama
    with pytest.raises(ConfigError, match="memit"):
        dt.edit(model, tokenizer, [FACT, FACT], method="rome", stats=stats)


def test_facts_files_json_and_jsonl(tmp_path):
    records = [FACT.to_dict(), {"subject": "plot", "prompt": "the {} was", "target": "awful"}]
    (tmp_path / "f.json").write_text(json.dumps(records))
    (tmp_path / "f.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    assert load_facts(tmp_path / "f.json") == load_facts(tmp_path / "f.jsonl") == [FACT, Fact("plot", "the {} was", "awful")]
    (tmp_path / "bad.json").write_text(json.dumps([{"subject": "x", "prompt": "{} is", "target": "y", "colour": 1}]))
    with pytest.raises(ConfigError, match="unknown key.*colour"):
        load_facts(tmp_path / "bad.json")


def test_packaged_facts_have_paraphrases_and_neighbourhoods():
    facts = packaged_facts()
    assert len(facts) >= 20 and len({(f.subject, f.prompt) for f in facts}) == len(facts)
    assert all(len(f.paraphrases) == 2 and len(f.neighbourhood) >= 2 and f.true_object for f in facts)
    assert all(f.target != f.true_object for f in facts)


# ---- CLI


def test_cli_edit_writes_a_delta_and_prints_efficacy(llama_folder, tmp_path, monkeypatch, capsys):
    from deltatune.cli import main

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats_module, "corpus_texts", lambda name: TEXTS)
    out = tmp_path / "edit"
    code = main(["edit", "--model", str(llama_folder), "--subject", "movie", "--prompt", "the {} was", "--target", "great",
                 "--layers", "1", "--stats-tokens", "400", "--steps", "40", "--lr", "3", "--min-probability", "0.01",
                 "--out", str(out)])
    captured = capsys.readouterr()
    text = captured.out
    assert code == 0, captured.err
    assert "before: efficacy" in text and "after:  efficacy" in text
    assert dt.read_meta(out)["provenance"]["edit"]["method"] == "rome"
    assert main(["inspect", str(out)]) == 0 and "lora" in capsys.readouterr().out


def test_cli_edit_that_does_not_converge_writes_nothing(llama_folder, tmp_path, monkeypatch, capsys):
    from deltatune.cli import main

    monkeypatch.setenv("DELTATUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(stats_module, "corpus_texts", lambda name: TEXTS)
    out = tmp_path / "edit"
    code = main(["edit", "--model", str(llama_folder), "--subject", "movie", "--prompt", "the {} was", "--target", "great",
                 "--layers", "1", "--stats-tokens", "400", "--steps", "1", "--min-probability", "0.9", "--out", str(out)])
    assert code == 2 and "did not converge" in capsys.readouterr().err and not out.exists()


def test_cli_bad_template_writes_nothing(tiny_llama, tmp_path, capsys):
    from deltatune.cli import main

    out = tmp_path / "edit"
    code = main(["edit", "--model", str(tiny_llama), "--subject", "film", "--prompt", "the movie was",
                 "--target", "great", "--out", str(out)])
    assert code == 2 and "not in the prompt" in capsys.readouterr().err and not out.exists()


LLAMA_STYLE = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "olmo", "stablelm", "starcoder2",
               "smollm3", "granite", "cohere"]


@pytest.mark.parametrize("name", LLAMA_STYLE)
def test_rome_on_the_architecture_sweeps_llama_style_decoders(name, llama, stats):
    """The sweep's decoders (two blocks, weights at std 0.3, the test tokenizer's vocabulary):
    the edit is found in each one's structure, and its LoRA adds the found value at the key. The
    second block is edited: Cohere's first MLP reads the token embeddings alone (attention runs
    beside it, not before), so over this 23-word corpus its keys span fewer directions than its
    width and the edit is refused as singular, rightly."""
    from tiny_models import ARCHITECTURES

    _, tokenizer = llama
    config = ARCHITECTURES[name].build().config
    config.vocab_size, config.initializer_range = len(tokenizer), 0.3
    torch.manual_seed(0)
    model = type(ARCHITECTURES[name].build())(config)
    site = edit_sites(model)[1]
    key = subject_key(model, tokenizer, FACT, site).float()
    module = model.get_submodule(site.path)
    with torch.no_grad():
        output_before = module(key[None]).double()[0]
    # the mechanics, not the edit's quality: some random decoders barely move (converging is tested above)
    settings = dataclasses.replace(FAST, min_probability=1e-6)
    report = dt.edit(model, tokenizer, FACT, layers=[1], stats=stats, settings=settings)
    with torch.no_grad():
        output_after = module(key[None]).double()[0]
    torch.testing.assert_close(output_after - output_before, report.values[0].delta, rtol=1e-4, atol=1e-5)
