"""``deltatune plan``: candidates, predictions against hand-computed cases and against real
``deltatune train`` runs of a tiny random BERT, budget verdicts, and bad input."""

from __future__ import annotations

import math
import re

import pytest
from conftest import make_model_folder, write_reviews

from deltatune.cli import main
from deltatune.core.registry import MethodSpec, method_specs, register_method
from deltatune.errors import ConfigError, DeltaError
from deltatune.methods.lora import LoRAConfig, build
from deltatune.train.job import TrainJob
from deltatune.tune.candidates import Candidate, method_candidates, planned_methods, sizes
from deltatune.tune.check import run_for_real, side_by_side
from deltatune.tune.plan import MIB, Budget, NothingFits, Row, judge, make_plan, predict

#: peak memory of a real run must be within this fraction of the prediction. The prediction's
#: parts are a fresh process's own setup peak and a resident high-water mark measured in the
#: probe; what is left is allocator noise of a few MiB, far below 25% of any training process.
MEMORY_TOLERANCE = 0.25
#: training minutes within this factor either way. The machine is shared (2 cores, other jobs
#: at the same time, nice 19): the same run's step time has been seen to vary by 2x between
#: runs, and a tiny model's ~10 ms steps are mostly Python overhead that load shifts most.
TIME_FACTOR = 4.0


def test_sizes_are_half_default_and_double():
    assert sizes(8) == [4, 8, 16]
    assert sizes(64) == [32, 64, 128]
    assert sizes(1) == [1, 2]  # half of 1 rounds to 0, kept at 1 and merged with the default


def test_each_declared_size_option_is_an_integer_option_with_a_default():
    declared = [spec for spec in method_specs() if spec.size_option]
    assert len(declared) >= 20
    for spec in declared:
        ladder = method_candidates(spec)
        assert len(ladder) >= 2, spec.name
        assert [c.size for c in ladder] == sorted(c.size for c in ladder)
        assert sum(c.default for c in ladder) == 1, spec.name
        assert all(c.options == ({} if c.default else {spec.size_option: c.size}) for c in ladder)


def test_a_method_without_a_size_option_is_one_candidate_at_its_defaults():
    ia3 = next(s for s in method_specs() if s.name == "ia3")
    assert ia3.size_option is None
    assert method_candidates(ia3) == [Candidate("ia3")]


def test_registering_a_size_option_that_is_not_a_config_field_is_refused():
    class Config(LoRAConfig):
        method = "sizeless_lora"

    with pytest.raises(ValueError, match="size_option 'rank' is not a field"):
        register_method(MethodSpec("sizeless_lora", Config, build, mergeable=True, identity_at_init=True,
                                   size_option="rank"))


def test_methods_not_trained_from_flags_are_left_out_with_a_reason():
    kept, left_out = planned_methods(["dense", "lora"])
    assert [s.name for s in kept] == ["lora"]
    assert "Python API" in left_out["dense"]
    with pytest.raises(ConfigError, match="unknown delta method 'nope'"):
        planned_methods(["nope"])
    with pytest.raises(ConfigError, match="none of the methods"):
        planned_methods(["dense"])


@pytest.mark.parametrize("field, flag", [("max_params", "--max-params"), ("max_memory_mb", "--max-memory"),
                                         ("max_minutes", "--max-minutes")])
@pytest.mark.parametrize("value", [0, -5, math.nan, math.inf])
def test_a_budget_must_be_positive(field, flag, value):
    with pytest.raises(ConfigError, match=f"{flag} must be a positive number, got"):
        Budget(**{field: value})


def test_prediction_from_the_probe_by_hand():
    probe = {"setup": {"peak_mb": 500.0, "resident_mb": 450.0}, "total_steps": 300}
    family = {"trainable": 1_000, "extra_mb": 80.0, "step_seconds": 0.5}
    row = predict(Candidate("lora", {"r": 16}, 16, False), {"trainable": 1_000 + MIB}, family, probe)
    # 450 resident + 80 measured + 16 bytes for each of the MiB extra parameters
    assert row.peak_mb == pytest.approx(450 + 80 + 16)
    assert row.minutes == pytest.approx(0.5 * 300 / 60)
    small = predict(Candidate("lora"), {"trainable": 1_000}, {**family, "extra_mb": 10.0}, probe)
    assert small.peak_mb == 500.0  # the setup's own peak is higher than resident + steps
    refused = predict(Candidate("road"), {"refused": "width 32 is not a multiple of 64"}, None, probe)
    assert not refused.fits and refused.why(Budget()) == "not applicable: width 32 is not a multiple of 64"


def _rows():
    return [Row(Candidate("a"), trainable=100, peak_mb=900.0, minutes=1.0),
            Row(Candidate("b"), trainable=300, peak_mb=950.0, minutes=2.0),
            Row(Candidate("c"), trainable=200, peak_mb=1_100.0, minutes=1.5),
            Row(Candidate("d"), trainable=5_000, peak_mb=980.0, minutes=9.0),
            Row(Candidate("e"), refused="cannot adapt")]


def test_judge_ranks_the_fits_and_says_what_each_other_breaks_by_how_much():
    budget = Budget(max_params=1_000, max_memory_mb=1_000, max_minutes=5, memory_margin=0)
    rows = judge(_rows(), budget)
    assert [(r.candidate.method, r.rank) for r in rows] == [("b", 1), ("a", 2), ("c", None), ("d", None), ("e", None)]
    by_name = {r.candidate.method: r for r in rows}
    assert by_name["c"].why(budget) == "breaks --max-memory by 100 MiB (1,100 > 1,000)"
    assert by_name["d"].why(budget) == ("breaks --max-params by 4,000 parameters (5,000 > 1,000); "
                                        "breaks --max-minutes by 4.00 min (9.00 > 5.00)")
    assert by_name["b"].why(budget) == "fits: uses 30% of --max-params, 95% of --max-memory, 40% of --max-minutes"


def test_the_memory_verdict_keeps_the_margin():
    budget = Budget(max_memory_mb=1_000, memory_margin=0.1)  # 900 x 1.1 = 990 fits; 950 x 1.1 = 1,045 does not
    rows = {r.candidate.method: r for r in judge(_rows(), budget)}
    assert rows["a"].fits and rows["a"].why(budget) == "fits: uses 90% of --max-memory (10% margin kept)"
    assert rows["b"].why(budget) == "breaks --max-memory by 45 MiB (1,045 with the 10% margin > 1,000)"
    with pytest.raises(ConfigError, match="--memory-margin must be a fraction of at least 0"):
        Budget(memory_margin=-0.1)


def test_evidence_ranks_before_parameters():
    budget = Budget(max_memory_mb=1_000, memory_margin=0)
    evidence = {"a": {"metric": "accuracy", "score": 0.9, "trainable": 100, "source": "compare.json (250 steps)"}}
    rows = judge(_rows(), budget, evidence)
    assert [r.candidate.method for r in rows if r.fits] == ["a", "d", "b"]
    assert "measured accuracy 0.9000 with 100 parameters in compare.json" in rows[0].why(budget)


def test_nothing_fits_names_the_tightest_budget_and_the_nearest_candidate():
    from deltatune.tune.plan import Plan

    budget = Budget(max_params=150, max_memory_mb=800, memory_margin=0)
    plan = Plan(TrainJob(), budget, judge(_rows(), budget), {}, {})
    with pytest.raises(NothingFits) as caught:
        plan.require_fit()
    message = str(caught.value)
    # every weighed candidate breaks --max-memory; three break --max-params
    assert "--max-memory is the tightest (4 of 4 candidates break it)" in message
    assert "the nearest is a (breaks --max-memory by 100 MiB (900 > 800)); raise --max-memory 900 to fit it" in message


# --- predictions against real runs of a tiny random BERT ------------------------------------

@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    model = make_model_folder(folder / "tiny-bert", "bert")
    data = write_reviews(folder / "reviews.csv", rows=200)
    job = TrainJob(model=str(model), data=str(data), text_column="review", label_column="sentiment", steps=40,
                   batch_size=8, max_length=32, progress=False)
    plan = make_plan(job, Budget(max_params=3_000, max_memory_mb=4_000, max_minutes=10),
                     methods=["lora", "adapter", "ia3", "road"])
    return job, plan, folder


@pytest.fixture(scope="module")
def real_runs(planned):
    job, plan, folder = planned
    labels = ["lora r=16", "adapter", "ia3"]
    rows = {r.candidate.label: r for r in plan.rows}
    checked = {label: side_by_side(rows[label], run_for_real(job, rows[label], folder / label.replace(" ", "_")))
               for label in labels}
    print(checked)  # the numbers behind the tolerances (pytest -s shows them)
    return checked


def test_trainable_parameters_by_hand(planned):
    _, plan, _ = planned
    rows = {r.candidate.label: r for r in plan.rows}
    head = 32 * 2 + 2  # the classifier, trained as modules_to_save
    for r in (4, 8, 16):  # LoRA on query and value of 2 layers, 32 x 32 each: r (32 + 32) per module
        label = "lora" if r == 8 else f"lora r={r}"
        assert rows[label].trainable == 4 * r * (32 + 32) + head
    assert rows["ia3"].trainable == 2 * (32 + 32 + 64) + head  # key, value (32) and ffn_down input (64) per layer


def test_predicted_parameters_equal_real_runs(real_runs):
    for label, checked in real_runs.items():
        assert checked["params_predicted"] == checked["params_measured"], label


def test_predicted_peak_memory_within_tolerance_of_real_runs(real_runs):
    for label, checked in real_runs.items():
        assert abs(checked["peak_mb_predicted"] / checked["peak_mb_measured"] - 1) <= MEMORY_TOLERANCE, checked


def test_predicted_minutes_within_a_factor_of_real_runs(real_runs):
    for label, checked in real_runs.items():
        assert 1 / TIME_FACTOR <= checked["minutes_ratio"] <= TIME_FACTOR, checked


def test_a_method_that_cannot_apply_is_listed_with_its_error(planned):
    _, plan, _ = planned
    road = next(r for r in plan.rows if r.candidate.method == "road")
    assert not road.fits and road.rank is None
    assert re.search(r"output width 32 is not a multiple of group_size=64", road.refused)


def test_the_plan_ranks_fits_and_marks_what_breaks_the_parameter_budget(planned):
    _, plan, _ = planned
    assert [r.rank for r in plan.fitting] == list(range(1, len(plan.fitting) + 1))
    assert all(r.trainable <= 3_000 for r in plan.fitting)
    broken = [r for r in plan.rows if r.breaks]
    assert broken and all("--max-params" in r.breaks for r in broken)
    assert {r.candidate.label for r in broken} >= {"lora r=16", "adapter"}


def test_bad_probe_settings_are_refused(planned):
    job, plan, _ = planned
    with pytest.raises(ConfigError, match="probe steps must be an integer of at least 2"):
        make_plan(job, Budget(), probe_steps=1, probe=plan.probe)
    with pytest.raises(ConfigError, match="size factors must be positive"):
        make_plan(job, Budget(), factors=(0.5, -1), probe=plan.probe)


# --- the command ----------------------------------------------------------------------------

def test_cli_nothing_fits_prints_the_table_and_names_the_tightest_budget(planned, tmp_path, capsys):
    job, _, _ = planned
    code = main(["plan", "--model", job.model, "--data", job.data, "--text-column", "review", "--label-column",
                 "sentiment", "--steps", "10", "--batch-size", "8", "--max-length", "32", "--methods", "lora", "ia3",
                 "--max-params", "100", "--out", str(tmp_path / "plan")])
    out, err = capsys.readouterr()
    assert code == 2
    assert "| lora r=4 | 1,090 |" in out
    assert "nothing fits the budget: --max-params is the tightest (4 of 4 candidates break it)" in err
    assert "the nearest is ia3" in err and "raise --max-params 322 to fit it" in err
    assert (tmp_path / "plan" / "plan.md").exists() and (tmp_path / "plan" / "plan.json").exists()


def test_cli_refuses_a_zero_budget_before_probing(capsys):
    assert main(["plan", "--max-memory", "0"]) == 2
    assert "--max-memory must be a positive number, got 0" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--model", "no-such-model", "unknown model 'no-such-model'"),
                                                  ("--data", "no-such-data", "unknown dataset 'no-such-data'")])
def test_cli_unknown_model_or_data_is_a_clear_error(flag, value, message, capsys):
    assert main(["plan", flag, value, "--methods", "lora", "--max-params", "1000"]) == 2
    assert message in capsys.readouterr().err


def test_the_probe_error_keeps_its_kind(planned):
    from deltatune.data.datasets import DataError

    job, _, _ = planned
    import dataclasses

    with pytest.raises(DataError, match="unknown dataset"):
        make_plan(dataclasses.replace(job, data="no-such-data"), Budget(max_params=10), methods=["ia3"])
    assert issubclass(DataError, DeltaError)
