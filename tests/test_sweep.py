"""``deltatune sweep``: the search space from the registry, pruning by successive halving,
resuming an interrupted study, the leaderboard and its Pareto fronts."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import deltatune
from deltatune.cli import main
from deltatune.errors import ConfigError, TargetError
from deltatune.models.load import load_model
from deltatune.train.job import TrainJob, run_train
from deltatune.tune import sweep as sweep_module
from deltatune.tune.sweep import resolve_targets, run_sweep
from deltatune.tune.sweep_config import parse_sweep_config
from deltatune.tune.sweep_report import fronts, leaderboard_markdown, pareto_front, ranked

POSITIVE, NEGATIVE = ["good", "great", "fine", "love", "nice"], ["bad", "awful", "poor", "hate", "dull"]
#: LoRA on the tiny BERT (hidden 32, 2 layers, head 32 -> 2): rank r on q and v is 2 layers x 2 modules
#: x r (32 + 32) parameters, the head 32 x 2 + 2
HEAD = 32 * 2 + 2


def lora_q_v(r: int) -> int:
    return 2 * 2 * r * (32 + 32) + HEAD


def lora_all_linear(r: int) -> int:
    """q, k, v, o (32 -> 32), intermediate (32 -> 64) and output (64 -> 32) in each of the 2 layers."""
    return 2 * r * (4 * (32 + 32) + 2 * (32 + 64)) + HEAD


@pytest.fixture(scope="module")
def words_csv(tmp_path_factory) -> Path:
    """Three words, all positive or all negative: a random tiny BERT learns it with LoRA in ~10 steps."""
    path = tmp_path_factory.mktemp("sweep-data") / "words.csv"
    rng = random.Random(0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for _ in range(160):
            label = rng.choice(["pos", "neg"])
            writer.writerow([" ".join(rng.sample(POSITIVE if label == "pos" else NEGATIVE, 3)), label])
    return path


def sweep_yaml(path: Path, model: Path, data: Path, **changes) -> Path:
    config = {"model": str(model), "data": str(data), "steps": 40, "eval_every": 10, "batch_size": 8,
              "max_length": 8, "seed": 0, "n_trials": 4, "out": str(path.parent / "sweep"),
              "space": {"methods": {"lora": {"r": [4, 8]}, "ia3": {}}, "lr": [1e-3, 2e-1],
                        "targets": ["default", "all-linear"]},
              **changes}
    path.write_text(yaml.safe_dump(config))
    return path


def test_on_eval_sees_each_evaluation_and_can_stop_training(tmp_path, tiny_bert, words_csv):
    seen = []

    def on_eval(step, metrics):
        seen.append((step, sorted(metrics)))
        return step == 20

    metrics = run_train(TrainJob(model=str(tiny_bert), data=str(words_csv), method="lora", steps=40, eval_every=10,
                                 batch_size=8, max_length=8, out=str(tmp_path / "run"), progress=False), on_eval=on_eval)
    assert seen == [(10, ["accuracy", "loss", "macro_f1"]), (20, ["accuracy", "loss", "macro_f1"])]
    assert metrics["steps"] == 20
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [s for s, _ in history["train"]] == list(range(1, 21))


def test_pareto_front_of_hand_made_points():
    points = [(10, 0.8), (20, 0.9), (15, 0.7), (30, 0.9), (5, 0.5), (10, 0.8), (40, 0.95)]
    # (15, .7) loses to (10, .8); (30, .9) to (20, .9); equal points do not dominate each other
    assert pareto_front(points) == [4, 0, 5, 1, 6]
    assert pareto_front([]) == []
    assert pareto_front([(1, 0.5)]) == [0]
    assert pareto_front([(1, 0.5), (1, 0.6)]) == [1]


def _row(trial, state, value, params, seconds, method="lora"):
    return {"trial": trial, "state": state, "method": method, "options": {"r": 4}, "lr": 1e-3, "targets": "default",
            "value": value, "trainable_parameters": params, "train_seconds": seconds, "steps": 40}


def test_leaderboard_ranks_complete_then_pruned_then_failed_and_marks_the_fronts():
    rows = [_row(0, "complete", 0.80, 1000, 5.0), _row(1, "pruned", 0.90, 500, 1.0), _row(2, "complete", 0.85, 3000, 4.0),
            _row(3, "fail", None, None, None), _row(4, "complete", 0.85, 2000, 9.0), _row(5, "complete", 0.70, 800, 2.0)]
    assert [r["trial"] for r in ranked(rows, maximize=True)] == [4, 2, 0, 5, 1, 3]
    # a pruned trial's accuracy is from an unfinished run: never on a front
    assert fronts(rows, maximize=True) == {"trainable_parameters": [5, 0, 4], "train_seconds": [5, 2]}
    # for a loss, lower is better
    assert [r["trial"] for r in ranked(rows, maximize=False)][:4] == [5, 0, 4, 2]
    summary = {"model": "m", "data": "d", "steps": 40, "eval_every": 10, "metric": "accuracy",
               "direction": "maximize", "pruner": "none"}
    text = leaderboard_markdown(rows, summary)
    assert "6 trials (4 complete, 1 pruned, 1 failed)" in text
    assert "| 4 | complete | lora | r=4 | 0.001 | default | 0.8500 | 2,000 | 9.0 | 40 |" in text
    assert "against trainable parameters: trial 5, trial 0, trial 4." in text
    assert "against train seconds: trial 5, trial 2." in text


def test_four_trial_sweep_prunes_the_trial_that_cannot_learn(tmp_path, tiny_bert, words_csv, capsys):
    first = [{"method": "lora", "r": 4, "lr": 0.1}, {"method": "lora", "r": 4, "lr": 1e-6},
             {"method": "lora", "r": 8, "lr": 0.1}, {"method": "lora", "r": 4, "lr": 0.1, "targets": ["q", "v"]}]
    config = sweep_yaml(tmp_path / "sweep.yaml", tiny_bert, words_csv, first_trials=first, n_trials=9,
                        pruner={"reduction_factor": 2}, space={"methods": {"lora": {"r": [4, 8]}}, "lr": [1e-6, 0.2],
                                                               "targets": ["default", "all-linear", ["q", "v"]]})
    out = tmp_path / "flags-out"
    assert main(["sweep", "--config", str(config), "--out", str(out), "--n-trials", "4"]) == 0
    printed = capsys.readouterr().out
    assert "| trial | state | method" in printed
    board = json.loads((out / "leaderboard.json").read_text())
    rows = {r["trial"]: r for r in board["trials"]}
    assert sorted(rows) == [0, 1, 2, 3]
    # at step 10 the trial at lr 1e-6 is still at chance while the others are right on every
    # validation example; with two trials at the rung only the better one goes on
    assert rows[1]["state"] == "pruned" and rows[1]["steps"] == 10 and rows[1]["value"] < 1.0
    assert [rows[t]["state"] for t in (0, 2, 3)] == ["complete"] * 3
    assert all(rows[t]["steps"] == 40 and rows[t]["value"] == 1.0 for t in (0, 2, 3))
    # the roles [q, v] are LoRA's default targets on BERT: the same modules, the same run
    assert [rows[t]["trainable_parameters"] for t in range(4)] == [lora_q_v(4), lora_q_v(4), lora_q_v(8), lora_q_v(4)]
    assert (rows[0]["options"], rows[3]["targets"], rows[1]["lr"]) == ({"r": 4}, "q,v", 1e-6)
    # equal accuracy: the cheapest complete trials (two equal points) are the front against parameters
    assert board["pareto_front"]["trainable_parameters"] == [0, 3]
    assert [r["trial"] for r in board["trials"]] == [0, 3, 2, 1]
    assert (out / "pareto.png").stat().st_size > 0 and (out / "leaderboard.md").read_text() in printed
    # every trial's delta, the pruned one's as it stood, loads onto the base
    for trial in range(4):
        loaded = load_model(str(tiny_bert), "classification", 2, ["neg", "pos"])
        report = deltatune.load(loaded.model, out / "trials" / str(trial))
        assert report.trainable == rows[trial]["trainable_parameters"]


def test_an_interrupted_sweep_resumes_without_training_finished_trials_again(tmp_path, tiny_bert, words_csv,
                                                                             monkeypatch):
    config = parse_sweep_config(yaml.safe_load(sweep_yaml(tmp_path / "s.yaml", tiny_bert, words_csv, steps=20,
                                                          pruner="none").read_text()))
    out = Path(config.out)
    trained = []

    def counting_run_train(job, on_eval=None):
        trained.append(Path(job.out).name)
        if Path(job.out).name == "2.partial":  # Ctrl-C in the middle of trial 2
            def on_eval(step, metrics):
                raise KeyboardInterrupt
        return run_train(job, on_eval=on_eval)

    monkeypatch.setattr(sweep_module, "run_train", counting_run_train)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(config, log=lambda line: None)
    assert trained == ["0.partial", "1.partial", "2.partial"]
    assert (out / "trials" / "2.partial").is_dir() and not (out / "sweep.lock").exists()
    kept = {t: (out / "trials" / str(t) / "delta.safetensors").stat().st_mtime_ns for t in (0, 1)}

    import optuna

    params = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}").trials[2].params

    trained.clear()
    result = run_sweep(config, log=lambda line: None)
    # the interrupted configuration ran again, as a new trial, then the sampler's next one
    assert trained == ["3.partial", "4.partial"]
    rows = {r["trial"]: r for r in result["rows"]}
    assert [rows[t]["state"] for t in range(5)] == ["complete", "complete", "fail", "complete", "complete"]
    assert rows[2]["note"] == "interrupted"
    for row in (rows[t] for t in (0, 1, 3, 4)):  # sampled configurations, counted by hand
        if row["method"] == "lora":
            count = lora_q_v if row["targets"] == "default" else lora_all_linear
            assert row["trainable_parameters"] == count(row["options"]["r"])
        elif row["targets"] == "default":  # (IA)3 on k, v (32 each) and ffn_down's input (64), 2 layers
            assert row["trainable_parameters"] == 2 * (32 + 32 + 64) + HEAD
    study = optuna.load_study(study_name="sweep", storage=f"sqlite:///{out / 'study.db'}")
    assert study.trials[3].params == params and study.trials[3].user_attrs["retry_of"] == 2
    assert {t: (out / "trials" / str(t) / "delta.safetensors").stat().st_mtime_ns for t in (0, 1)} == kept
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "1", "3", "4"]

    trained.clear()
    run_sweep(config, log=lambda line: None)  # nothing left to do
    assert trained == []
    changed = parse_sweep_config({**yaml.safe_load((tmp_path / "s.yaml").read_text()), "steps": 30, "pruner": "none"})
    with pytest.raises(ConfigError, match=r"started with other settings \(job differ\).*another --out"):
        run_sweep(changed, log=lambda line: None)


def test_a_sweep_killed_mid_trial_resumes(tmp_path, tiny_bert, words_csv, monkeypatch):
    config_path = sweep_yaml(tmp_path / "s.yaml", tiny_bert, words_csv, steps=100, eval_every=50, n_trials=2,
                             pruner="none")
    out = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "deltatune.cli", "sweep", "--config", str(config_path)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None and not (out / "trials" / "1.partial").exists():
        time.sleep(0.02)
    assert process.poll() is None, f"the sweep ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (out / "trials" / "0" / "delta.safetensors").exists() and not (out / "trials" / "1").exists()
    kept = (out / "trials" / "0" / "delta.safetensors").stat().st_mtime_ns

    trained = []
    monkeypatch.setattr(sweep_module, "run_train", lambda job, on_eval=None: trained.append(job.out) or run_train(job))
    result = run_sweep(parse_sweep_config(yaml.safe_load(config_path.read_text())), log=lambda line: None)
    assert [Path(t).name for t in trained] == ["2.partial"]
    assert [(r["trial"], r["state"], r.get("note")) for r in sorted(result["rows"], key=lambda r: r["trial"])] == [
        (0, "complete", None), (1, "fail", "interrupted"), (2, "complete", None)]
    assert (out / "trials" / "0" / "delta.safetensors").stat().st_mtime_ns == kept
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0", "2"]


def test_a_failing_trial_is_recorded_and_replaced(tmp_path, tiny_bert, words_csv, monkeypatch):
    from deltatune.train.loop import TrainingDiverged

    def fake_run_train(job, on_eval=None):  # no training: trial 1 diverges, the others score by their rank
        Path(job.out).mkdir(parents=True)
        if Path(job.out).name == "1.partial":
            raise TrainingDiverged("loss became nan at step 3")
        return {"validation": {"accuracy": job.options.get("r", 0) / 10}, "trainable_parameters": 100, "steps": 40,
                "train_seconds": 1.0, "test": {}}

    monkeypatch.setattr(sweep_module, "run_train", fake_run_train)
    config = parse_sweep_config(yaml.safe_load(sweep_yaml(tmp_path / "s.yaml", tiny_bert, words_csv, n_trials=2,
                                                          space={"methods": {"lora": {"r": [4, 8]}}}).read_text()))
    lines = []
    rows = run_sweep(config, log=lines.append)["rows"]
    assert [(r["trial"], r["state"]) for r in rows][-1] == (1, "fail")
    assert rows[-1]["note"] == "error: loss became nan at step 3" and "trial 1 failed: loss became nan" in "\n".join(lines)
    assert sorted(r["trial"] for r in rows if r["state"] == "complete") == [0, 2]
    assert rows[0]["value"] == max(r["value"] for r in rows[:2]) == rows[0]["options"]["r"] / 10
    assert sorted(p.name for p in (Path(config.out) / "trials").iterdir()) == ["0", "2"]


BASE = {"model": "minilm", "data": "movie-reviews", "steps": 20, "eval_every": 5}


@pytest.mark.parametrize("changes, message", [
    ({"space": {"methods": ["lora", "loar"]}}, r"space.methods: unknown delta method 'loar'; available: .*lora.*ia3"),
    ({"space": {"methods": {"lora": {"rank_size": [4]}}}},
     r"space.methods.lora: 'rank_size' is not an option of lora; lora takes alpha, dropout, init, r, rank_pattern"),
    ({"space": {"methods": {"ia3": {"r": [4]}}}}, r"'r' is not an option of ia3; ia3 takes"),
    ({"space": {"methods": {"lora": {"r": [4, -1]}}}}, r"space.methods.lora.r: choice -1 is refused by lora: .*positive"),
    ({"space": {"methods": ["lora"], "lr": [1e-2, 1e-4]}}, r"space.lr: .*low > high; swap them"),
    ({"space": {"methods": ["lora"], "lr": [1e-4, 1e-3, 1e-2]}}, r"space.lr: a learning-rate range is \[low, high\]"),
    ({"space": {"methods": ["lora"], "targets": [["q,v"]]}}, r"\(no commas\), got .*; write \[q, v\]"),
    ({"space": {"methods": ["head"], "targets": ["all-linear"]}, "lr": 1}, r"unknown key\(s\) \['lr'\]; lr are searched"),
    ({"space": {"methods": {"head": {"targets": ["all-linear"]}}}}, r"space.methods.head.targets: head takes no targets"),
    ({"space": {"methods": []}}, r"space.methods: list the methods to search .*lora"),
    ({"space": {"methods": ["lora"]}, "batchsize": 8}, r"unknown key\(s\) \['batchsize'\].*batch_size"),
    ({"space": {"methods": ["lora"]}, "eval_every": None, "steps": None}, r"pruning needs evaluations.*pruner: none"),
    ({"space": {"methods": ["lora"]}, "steps": "many"}, r"setting 'steps' must be an integer or null, got 'many'"),
    ({"space": {"methods": ["lora"]}, "pruner": {"reduction_factor": 1}}, r"pruner.reduction_factor must be an integer >= 2"),
    ({"space": {"methods": {"lora": {"r": [4, 8]}}}, "first_trials": [{"method": "lora", "r": 16}]},
     r"first_trials\[0\].r: 16 is not one of the choices \[4, 8\]"),
    ({"space": {"methods": ["lora"]}, "first_trials": [{"method": "ia3"}]},
     r"first_trials\[0\]: method 'ia3' is not in space.methods \(lora\)"),
    ({}, r"no 'space'; add space:"),
])
def test_config_errors_name_the_key_and_the_fix(changes, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep_config({**BASE, **changes})


def test_method_options_come_from_the_config_class_with_aliases_and_yaml_strings():
    config = parse_sweep_config({**BASE, "space": {"methods": {"lora": {"rank": [4, "8"], "lr": "1e-3"}, "bitfit": None},
                                                   "lr": ["1e-4", "1e-2"], "targets": [["q", "v"], "all-linear"]}})
    lora, bitfit = config.space.methods["lora"], config.space.methods["bitfit"]
    assert lora.options == {"r": (4, 8)} and (lora.lr.low, lora.lr.high) == (1e-3, 1e-3)
    assert bitfit.options == {} and (bitfit.lr.low, bitfit.lr.high) == (1e-4, 1e-2)
    assert lora.targets == ("q,v", "all-linear")


def test_targets_choices_resolve_roles_from_the_structure(tiny_bert):
    model = load_model(str(tiny_bert), "classification", 2, ["neg", "pos"]).model
    patterns = resolve_targets(model, "q,v")
    assert len(patterns) == 2 and all(p.startswith("re:") for p in patterns)
    from deltatune.core.targeting import select_modules

    chosen = sorted(name for name, _ in select_modules(model, patterns))
    assert chosen == [f"bert.encoder.layer.{i}.attention.self.{m}" for i in (0, 1) for m in ("query", "value")]
    assert resolve_targets(model, "default") is None and resolve_targets(model, "all-linear") == ["all-linear"]
    assert resolve_targets(model, "*.query") == ["*.query"]
    with pytest.raises(TargetError, match="'\\*.q_proj' matched no module"):
        resolve_targets(model, "*.q_proj")
