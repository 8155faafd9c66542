"""Fully sharded training: ``deltatune train --sharding fsdp`` under ``torchrun`` with 2 CPU
processes (gloo) runs FSDP2 (``fully_shard`` on each transformer block, then the root) and gives
the delta of a one-process run with the same global batch and seed; only rank 0 writes files,
the saved delta loads on a plain one-process base, and ``metrics.json`` has every rank's memory.

Tolerance. As with DDP (``test_distributed.py``), the runs differ only in float32 summation
order: FSDP reduce-scatters the two ranks' gradients of their halves of each batch. Measured on
this test's LoRA run (6 AdamW steps, batches of 19 that split 10/9 and a last batch of one row,
model without dropout): largest difference 3.5e-8 absolute; with batches of 8, 1.5e-8 absolute
and 1.4e-6 relative to the tensor's largest entry; DDP gives the same numbers on these runs. The
resumed run (2 more steps from the gathered checkpoint) differs by 7.5e-9. Over every method
FSDP can train, 3 steps on this model, the largest difference was 1.0e-6 (loha), the same
number DDP gives for loha (molora's balancing term, computed per rank on its own rows, differs
by 1e-2 under DDP and FSDP alike).
So this test asserts the DDP test's ``rtol=1e-4, atol=1e-6``.
"""

from __future__ import annotations

import json

import pytest

from deltatune.errors import ConfigError
from deltatune.train.job import TrainJob, run_eval
from test_distributed import _assert_same_run, _launch, _single, resume_both_ways, setup  # noqa: F401  (setup: the fixture)

TORCHRUN = ["torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def test_fsdp_two_processes_equal_one_process(setup):  # noqa: F811
    # 96 training rows in batches of 19: ranks take 10 and 9 rows; rank 1 has none at step 6
    single = _single(setup, "single-19", 19)
    launched, stdout = _launch(setup, TORCHRUN, "fsdp-19", 19, extra=("--sharding", "fsdp"))
    _assert_same_run(single, launched, stdout)
    metrics = json.loads((launched / "metrics.json").read_text())
    reference = json.loads((single / "metrics.json").read_text())
    assert metrics["sharding"] == "fsdp" and reference["sharding"] is None
    # each rank holds half of every parameter (rows padded to an even split), not a whole copy
    whole = reference["parameter_mb_per_rank"][0]
    assert all(0.45 * whole < mb < 0.6 * whole for mb in metrics["parameter_mb_per_rank"])
    # the saved delta is an ordinary delta: it loads on a plain one-process base and evaluates the same
    evaluated = run_eval(launched, TrainJob.from_yaml(launched / "config.yaml"))
    assert evaluated["test"]["loss"] == pytest.approx(metrics["test"]["loss"], rel=1e-6)


def test_fsdp_resume_splits_the_checkpoint_into_shards_again(setup):  # noqa: F811
    # the step-6 checkpoint (gathered whole, written by rank 0) resumed for 2 more steps on
    # 2 FSDP ranks and in one process: parameters and Adam state re-sharded give the same delta
    resume_both_ways(setup, "fsdp-19", "resume-fsdp", TORCHRUN)


@pytest.mark.parametrize("changes, message", [
    ({"sharding": "zero3"}, "--sharding 'zero3' is not a sharding; use one of ddp, fsdp"),
    ({"sharding": "fsdp", "method": "adalora"}, "--sharding fsdp cannot train method 'adalora': its orthogonality"),
    ({"sharding": "fsdp", "method": "full"}, "--sharding fsdp cannot train method 'full'"),
    ({"sharding": "fsdp", "quantize": "int8"}, "--sharding fsdp shards plain float tensors, and --quantize int8"),
])
def test_fsdp_refusals_name_the_problem_and_the_fix(changes, message):
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as error:
        TrainJob(**changes)
    assert "--sharding ddp" in str(error.value) or "use one of" in str(error.value)
