"""Routing over a library: Arrow against a token-by-token reference, the centroid router against
hand cases, ``route_auto`` end to end, and its bad input."""

from __future__ import annotations

import pytest
import torch

import deltatune as dt
from deltatune.errors import FingerprintError, LibraryError, NotApplicableError
from deltatune.library import Library, arrow, embed, nearest, prototype, route_auto
from deltatune.models.load import load_model

NAMES = ("sentiment", "spam", "topic")
TEXTS = ["good movie", "the plot was very dull", "what a great film", "bad"]


def tiny_classifier(folder, seed: int = 0):
    torch.manual_seed(seed)
    loaded = load_model(str(folder), "classification", 2)
    loaded.model.eval()
    return loaded.model, loaded.tokenizer


def randomise(model, name: str, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, name):
            p.add_(scale * torch.randn(p.shape, generator=generator))


def with_loras(folder, heads: bool = True):
    model, tokenizer = tiny_classifier(folder)
    for seed, name in enumerate(NAMES):
        config = dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"] if heads else [])
        dt.attach(model, config, name=name, activate=False)
        randomise(model, name, seed)
    return model, tokenizer


@pytest.fixture(scope="module")
def saved(tiny_bert, tmp_path_factory):
    """Three LoRA deltas with heads saved on the tiny base, and one saved on another base."""
    root = tmp_path_factory.mktemp("routing")
    model, _ = with_loras(tiny_bert)
    for name in NAMES:
        dt.save(model, root / name, name)
    other, _ = tiny_classifier(tiny_bert)
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.add_(0.5)
    dt.attach(other, dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]), name="foreign")
    randomise(other, "foreign", 9)
    dt.save(other, root / "foreign", "foreign")
    return root


def library_of(tmp_path, saved, names) -> Library:
    library = Library(tmp_path / "lib.db")
    for name in names:
        library.add(saved / name)
    return library


# --- Arrow ----------------------------------------------------------------------------------


def test_prototype_is_the_top_right_singular_vector_of_the_product():
    generator = torch.Generator().manual_seed(0)
    B, A = torch.randn(24, 4, generator=generator), torch.randn(4, 16, generator=generator)
    reference = torch.linalg.svd(B @ A).Vh[0]  # full SVD of the 24 x 16 product
    assert abs(float(prototype(B, A) @ reference)) == pytest.approx(1.0, abs=1e-5)


def naive_arrow_module(module, units, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """The module's Arrow output, token by token: prototypes by full SVD of each B A."""
    updates = [u.delta_weight().detach() for u in units]  # s B A, (out, in)
    prototypes = [torch.linalg.svd(w).Vh[0] for w in updates]
    rows = []
    for h in x.reshape(-1, x.shape[-1]):
        y = module.weight @ h + module.bias
        scores = torch.tensor([abs(float(v @ h)) for v in prototypes])
        best = sorted(range(len(units)), key=lambda i: -scores[i])[:top_k]
        weights = torch.softmax(scores[best], 0)
        for weight, i in zip(weights, best):
            y = y + weight * (updates[i] @ h)
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_arrow_at_a_module_equals_a_token_by_token_reference(tiny_bert, top_k):
    model, tokenizer = with_loras(tiny_bert)
    module = model.bert.encoder.layer[1].attention.self.value
    seen = {}
    handle = module.register_forward_hook(lambda m, args, out: seen.update(x=args[0], y=out))
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), arrow(model, NAMES, top_k=top_k):
        model(**batch)
    handle.remove()
    units = [module.deltas[name] for name in NAMES]
    expected = naive_arrow_module(module, units, seen["x"], top_k)
    assert torch.allclose(seen["y"], expected, atol=1e-5)


def test_arrow_with_one_delta_equals_that_delta_alone(tiny_bert):
    model, tokenizer = with_loras(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        with dt.using(model, "spam"):
            expected = model(**batch).logits
        with arrow(model, ["spam"], top_k=1, token_mask=batch["attention_mask"]) as plan:
            got = model(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5)
    assert plan.choice == ["spam"] * len(TEXTS)


def test_arrow_gives_each_row_the_head_of_its_most_voted_delta(tiny_bert):
    model, tokenizer = with_loras(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    pooled = {}
    handle = model.classifier.register_forward_hook(lambda m, args, out: pooled.update(x=args[0], y=out))
    with torch.no_grad(), arrow(model, NAMES, top_k=2, token_mask=batch["attention_mask"], trace=True) as plan:
        model(**batch)
    handle.remove()
    assert plan.votes.shape == (len(TEXTS), 3)
    assert len(plan.trace) == 4 and torch.allclose(sum(plan.trace), plan.votes)
    # every module adds 1 per token (weights sum to 1), averaged over tokens: 4 adapted modules
    assert torch.allclose(plan.votes.sum(-1), torch.full((len(TEXTS),), 4.0), atol=1e-5)
    for row, name in enumerate(plan.choice):
        head = model.classifier.deltas[name].copy
        assert torch.allclose(pooled["y"][row], head(pooled["x"][row]), atol=1e-6)
    assert len(set(plan.choice)) > 1  # a case where rows differ, so the head choice is exercised


def test_arrow_refuses_a_delta_that_is_not_low_rank_by_name(tiny_bert):
    model, _ = with_loras(tiny_bert)
    dt.attach(model, dt.IA3Config(), name="scaled", activate=False)
    with pytest.raises(NotApplicableError, match=r"delta 'scaled' \(ia3.*not one.*centroid"):
        with arrow(model, ["sentiment", "scaled"]):
            pass
    with pytest.raises(dt.DeltaStateError, match="top_k"):
        with arrow(model, ["sentiment"], top_k=0):
            pass


# --- the centroid router --------------------------------------------------------------------


def test_nearest_centroid_by_cosine_hand_case():
    centroids = {"a": torch.tensor([2.0, 0.0]), "b": torch.tensor([0.0, 1.0])}
    rows = torch.tensor([[1.0, 0.0], [0.0, 5.0], [1.0, 1.1], [-1.0, 0.2], [3.0, 2.9]])
    # cosines: (1, 0), (0, 1), (.67, .74), (-.98, .2), (.72, .70)
    assert nearest(rows, centroids) == ["a", "b", "b", "b", "a"]
    with pytest.raises(LibraryError, match="3 values but this base's embeddings have 2"):
        nearest(rows, {"c": torch.zeros(3)})
    with pytest.raises(LibraryError, match="no delta has a centroid"):
        nearest(rows, {})


def test_embedding_is_the_mean_of_unpadded_last_hidden_states(tiny_bert):
    model, tokenizer = tiny_classifier(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    got = embed(model, batch)
    for row, text in enumerate(TEXTS):
        alone = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            hidden = model(**alone, output_hidden_states=True).hidden_states[-1][0]
        assert torch.allclose(got[row], hidden.mean(0), atol=1e-5)


def test_route_auto_centroid_sends_each_row_to_its_nearest_delta(tiny_bert, saved, tmp_path):
    library = library_of(tmp_path, saved, NAMES)
    model, tokenizer = tiny_classifier(tiny_bert)
    anchors = embed(model, tokenizer(TEXTS[:3], padding=True, return_tensors="pt"))
    for name, vector in zip(NAMES, anchors):
        library.set_centroid(name, vector, examples=1)
    texts = [TEXTS[2], TEXTS[0], TEXTS[1], TEXTS[0]]
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad(), route_auto(model, library, batch) as chosen:
        got = model(**batch).logits
    assert chosen.choice == ["topic", "sentiment", "spam", "sentiment"]
    with torch.no_grad(), dt.route(model, chosen.choice):
        assert torch.allclose(got, model(**batch).logits)
    assert set(dt.list_deltas(model)) == set(NAMES) and dt.active_deltas(model) == ()


def test_route_auto_arrow_loads_the_library_and_routes(tiny_bert, saved, tmp_path):
    library = library_of(tmp_path, saved, NAMES)
    model, tokenizer = tiny_classifier(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad(), route_auto(model, library, batch, router="arrow", top_k=2) as chosen:
        got = model(**batch).logits
    reference, _ = with_loras(tiny_bert)
    with torch.no_grad(), arrow(reference, NAMES, top_k=2, token_mask=batch["attention_mask"]) as plan:
        expected = reference(**batch).logits
    assert chosen.choice == plan.choice and torch.allclose(got, expected, atol=1e-5)


# --- bad input ------------------------------------------------------------------------------


def test_routing_over_an_empty_library_says_so(tiny_bert, tmp_path):
    model, tokenizer = tiny_classifier(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(LibraryError, match="is empty.*library add"):
        with route_auto(model, Library(tmp_path / "empty.db"), batch):
            pass
    with pytest.raises(LibraryError, match="does not exist"):
        with route_auto(model, tmp_path / "absent.db", batch):
            pass


def test_routing_refuses_deltas_of_another_base(tiny_bert, saved, tmp_path):
    model, tokenizer = tiny_classifier(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    only_foreign = library_of(tmp_path, saved, ["foreign"])
    with pytest.raises(LibraryError, match="none for this BertForSequenceClassification.*made for "
                                           "BertForSequenceClassification [0-9a-f]{12}"):
        with route_auto(model, only_foreign, batch, router="arrow"):
            pass
    only_foreign.add(saved / "sentiment")
    with pytest.raises(FingerprintError, match="'foreign' was made for another base"):
        with route_auto(model, only_foreign, batch, names=["sentiment", "foreign"]):
            pass
    assert dt.list_deltas(model) == []  # nothing loaded on refusal


def test_unrouted_bad_options_are_clear(tiny_bert, saved, tmp_path):
    library = library_of(tmp_path, saved, NAMES)
    model, tokenizer = tiny_classifier(tiny_bert)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with pytest.raises(LibraryError, match="router must be one of 'centroid', 'arrow'"):
        with route_auto(model, library, batch, router="nearest"):
            pass
    with pytest.raises(LibraryError, match="no delta has a centroid"):
        with route_auto(model, library, batch):
            pass
    with pytest.raises(LibraryError, match="pass the tokenised batch"):
        with route_auto(model, library):
            pass


# --- heads of other widths, eval --delta auto -----------------------------------------------

WIDTHS = {"sentiment": ["neg", "pos"], "topic": ["what", "why", "yes"]}


@pytest.fixture(scope="module")
def wide_and_narrow(tiny_bert, tmp_path_factory):
    """Two deltas on one base whose heads have 2 and 3 labels."""
    root = tmp_path_factory.mktemp("widths")
    for seed, (name, labels) in enumerate(WIDTHS.items()):
        torch.manual_seed(seed)
        model = load_model(str(tiny_bert), "classification", len(labels)).model.eval()
        dt.attach(model, dt.LoRAConfig(r=4, targets=["query", "value"], modules_to_save=["classifier"]), name=name)
        randomise(model, name, seed)
        dt.save(model, root / name, name, labels=labels)
    return root


def reference_answer(folder, root, name: str, text: str) -> str:
    labels = WIDTHS[name]
    loaded = load_model(str(folder), "classification", len(labels))
    model, tokenizer = loaded.model.eval(), loaded.tokenizer
    dt.load(model, root / name)
    with torch.no_grad():
        logits = model(**tokenizer([text], return_tensors="pt")).logits[0]
    return labels[int(logits.argmax())]


def test_each_row_is_answered_by_its_routed_deltas_head_whatever_its_width(tiny_bert, wide_and_narrow, tmp_path):
    from deltatune.library.evaluate import routed_answers

    library = library_of(tmp_path, wide_and_narrow, WIDTHS)
    model, tokenizer = tiny_classifier(tiny_bert)
    anchors = embed(model, tokenizer(TEXTS[:2], padding=True, return_tensors="pt"))
    library.set_centroid("sentiment", anchors[0], 1)
    library.set_centroid("topic", anchors[1], 1)
    texts = [TEXTS[1], TEXTS[0], TEXTS[1]]
    choices, answers = routed_answers(model, tokenizer, library, texts)
    assert choices == ["topic", "sentiment", "topic"]
    assert answers == [reference_answer(tiny_bert, wide_and_narrow, c, t) for c, t in zip(choices, texts)]


def test_cli_eval_delta_auto_reports_accuracy_and_where_rows_went(tiny_bert, wide_and_narrow, tmp_path, capsys):
    import json

    from conftest import write_reviews

    from deltatune.cli import main

    library = library_of(tmp_path, wide_and_narrow, WIDTHS)
    model, tokenizer = tiny_classifier(tiny_bert)
    for name, text in zip(WIDTHS, TEXTS[:2]):
        library.set_centroid(name, embed(model, tokenizer([text], return_tensors="pt"))[0], 1)
    data = write_reviews(tmp_path / "reviews.csv", rows=40)
    code = main(["eval", "--delta", "auto", "--library", str(library.db), "--model", str(tiny_bert), "--data",
                 str(data), "--text-column", "review", "--label-column", "sentiment", "--router", "arrow"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["delta"] == "auto" and result["router"] == "arrow"
    assert sum(result["test"]["routed"].values()) == result["data"]["sizes"]["test"]
    assert 0.0 <= result["test"]["accuracy"] <= 1.0
