"""The compare table and chart written by ``deltatune demo --compare``."""

from __future__ import annotations

from deltatune.cli.compare import plot, table
from deltatune.train.job import TrainJob


def _row(method, accuracy, trainable):
    return {"method": method, "test": {"accuracy": accuracy, "macro_f1": accuracy - 0.01}, "trainable_parameters": trainable,
            "percent_trainable": trainable / 1e5, "delta_bytes": trainable * 4, "train_seconds": 12.3, "peak_memory_mb": 900.0,
            "data": {"sizes": {"train": 8, "validation": 1, "test": 1}}}


def test_table_has_one_row_per_method_with_every_column(tmp_path):
    rows = [_row("head", 0.61, 770), _row("lora", 0.83, 148_000)]
    text = table(rows, TrainJob(steps=250))
    assert "| method | accuracy | macro-F1 | trainable params | % trainable | delta file | train time | peak memory |" in text
    assert "| lora * | 0.8300 | 0.8200 | 148,000 | 1.480% | 578 KiB | 12 s | 900 MiB |" in text
    assert "250 steps of batch 32" in text
    assert "Pareto front (accuracy against trainable parameters): head, lora." in text
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_pareto_front_keeps_only_undominated_methods():
    from deltatune.cli.compare import pareto_front

    rows = [_row("head", 0.65, 770), _row("ia3", 0.81, 14_000), _row("prompt", 0.72, 8_000),
            _row("bitfit", 0.78, 27_000), _row("lora", 0.83, 148_000), _row("adapter", 0.82, 596_000),
            _row("full", 0.84, 22_000_000)]
    # bitfit: ia3 is more accurate with fewer parameters; adapter: lora likewise
    assert pareto_front(rows) == ["head", "prompt", "ia3", "lora", "full"]
    assert pareto_front([_row("a", 0.8, 10), _row("b", 0.8, 10)]) == ["a", "b"]  # ties dominate nothing


def test_summary_names_the_methods_below_the_floor_and_those_reaching_full_fine_tuning():
    from deltatune.cli.compare import summary

    rows = [_row("head", 0.65, 770), _row("prompt", 0.64, 8_000), _row("lora", 0.834, 148_000), _row("full", 0.837, 22_000_000)]
    text = "\n".join(summary(rows))
    assert "At or below the head-only floor (0.6500): prompt." in text
    assert "Within half a point of full fine-tuning (0.8370): lora (148,000 parameters)." in text


def test_keep_reuses_rows_trained_on_the_same_budget_only(tmp_path, monkeypatch):
    import json

    from deltatune.cli import compare

    base = TrainJob(model="minilm", data="movie-reviews", steps=250, batch_size=32, max_length=48, seed=0)
    same = {**_row("head", 0.65, 770), "model": "minilm", "steps": 250, "seed": 0,
            "data": {"name": "movie-reviews", "sizes": {"train": 8}}, "settings": {"batch_size": 32, "max_length": 48}}
    other = {**same, "method": "ia3", "steps": 100}
    (tmp_path / "compare.json").write_text(json.dumps([same, other]))
    trained = []

    def fake_train(config_path):
        config = __import__("yaml").safe_load(open(config_path))
        trained.append(config["method"])
        folder = tmp_path / "runs" / config["method"]
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({**same, "method": config["method"]}))
        return 0, ""

    monkeypatch.setattr(compare, "_train", fake_train)
    compare.run_compare(base, tmp_path / "runs", tmp_path, methods=["head", "ia3"], keep=True)
    assert trained == ["ia3"]  # head kept; ia3's old row had another step count
    assert [r["method"] for r in json.loads((tmp_path / "compare.json").read_text())] == ["head", "ia3"]


def test_causal_rows_compare_test_loss_with_the_base_models(tmp_path):
    from deltatune.cli.compare import pareto_front, summary

    def causal(method, loss, trainable):
        return {**_row(method, 0.0, trainable), "task": "causal_lm",
                "test": {"loss": loss, "perplexity": 2.718 ** loss}, "base_test": {"loss": 3.0, "perplexity": 20.1}}

    rows = [causal("lora", 2.1, 1000), causal("ia3", 3.2, 100), causal("dora", 2.2, 2000)]
    assert pareto_front(rows) == ["ia3", "lora"]  # lower loss is better; dora is dominated by lora
    assert "Test loss not below the base model's (3.0000): ia3." in "\n".join(summary(rows))
    text = table(rows, TrainJob(steps=20))
    assert "| method | test loss | base loss | perplexity | trainable params |" in text
    assert "| lora * | 2.1000 | 3.0000 |" in text
    plot(rows, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_a_method_that_cannot_apply_is_recorded_with_its_reason_and_the_others_still_run(tmp_path, tiny_llama, reviews_csv):
    """A Llama has no biases: BitFit's training process exits with status 3 (not applicable),
    the compare records why and trains the next method; ``--keep`` reuses the refusal."""
    import json

    from deltatune.cli import compare

    base = TrainJob(model=str(tiny_llama), data=str(reviews_csv), text_column="review", label_column="sentiment",
                    steps=2, batch_size=4, max_length=16, seed=0, progress=False)
    assert compare.run_compare(base, tmp_path / "runs", tmp_path, methods=["bitfit", "head"]) == 0
    rows = json.loads((tmp_path / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["bitfit", "head"]
    assert "has a bias" in rows[0]["not_applicable"] and "test" in rows[1]
    text = (tmp_path / "compare.md").read_text()
    assert f"Not applicable to {tiny_llama}: `bitfit` (no module of LlamaForSequenceClassification has a bias" in text
    assert "| head * |" in text and "| bitfit" not in text
    assert compare.same_budget(rows[0], base)  # so --keep does not retry it
