"""The measured probe behind ``deltatune plan``, run in a fresh process.

The probe process does what ``deltatune train`` does before its first step (imports, data,
model, tokenising) and records its peak resident memory then: the **setup** memory every
run pays. Then, per method (a *family*, at its default size), it attaches the delta, runs a
few real training steps (the loop's own step: forward, loss terms, backward, clipping,
AdamW, step hooks) at the real batch shape, and records:

- the step time (median of the steps after the first, which warms up);
- the memory the steps added: the resident peak during them (the kernel's high-water mark,
  reset before each family through ``/proc/self/clear_refs``) minus the resident memory just
  before the attach. The first step runs on the widest batch the data can make, so the peak
  includes the largest activations a run meets.

It also counts every candidate's trainable parameters exactly, by attaching its config the
way a training job does, reading the attach report and deleting the delta again.

Run as ``python -m deltatune.tune.probe REQUEST.json RESULT.json``; :func:`probe_in_fresh_process`
does that and returns the result.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from ..core.inject import after_step, attach, delete, loss_terms
from ..core.params import count_parameters
from ..core.recompute import enable_gradient_checkpointing
from ..errors import ConfigError, DeltaError, NotApplicableError, TargetError
from ..io.atomic import write_text_atomic
from ..train import distributed
from ..train.batches import BatchPlan, Encoded, encode, to_device
from ..train.job import TrainJob, delta_config, peak_memory_mb, prepare
from ..train.loop import total_steps

#: what a failed candidate's attach raises: the method (or this size of it) cannot apply
REFUSALS = (NotApplicableError, TargetError, ConfigError)
PROBE_NAME = "plan_probe"


def resident_mb() -> float:
    """This process's resident memory now, in MiB (``VmRSS``)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise OSError("/proc/self/status has no VmRSS line")


def reset_peak() -> bool:
    """Reset the kernel's resident high-water mark of this process (Linux); False when it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc), so the next
    family's resident memory starts from what is really in use."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def widest_rows(data: Encoded, batch_size: int) -> list[int]:
    """The ``batch_size`` longest examples: the widest batch a run can meet."""
    order = sorted(range(len(data)), key=lambda i: len(data.input_ids[i]), reverse=True)
    return order[:batch_size]


def _training_step(model, batch, optimizer, params, step: int, total: int, grad_clip: float) -> None:
    """One step as :func:`deltatune.train.loop.train` takes it (one process)."""
    loss = model(**batch).loss
    extra = loss_terms(model)
    if extra is not None:
        loss = loss + extra
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    after_step(model, step + 1, total)
    optimizer.zero_grad(set_to_none=True)


def _attach(job: TrainJob, model, task: str) -> tuple[int, Any]:
    """Attach the job's delta (or unfreeze the base for a method that trains it); its trainable
    count as the training job reports it."""
    config = delta_config(job, model, task)
    if config is None:
        model.requires_grad_(True)
        return count_parameters(model), None
    return attach(model, config, name=PROBE_NAME).trainable, config


def _detach(model, config) -> None:
    if config is None:
        model.requires_grad_(False)
    else:
        delete(model, PROBE_NAME)


def count_trainable(job: TrainJob, model, task: str) -> int:
    """The exact trainable parameters of ``job``'s delta on ``model``, as ``train`` reports them."""
    trainable, config = _attach(job, model, task)
    _detach(model, config)
    return trainable


def probe_family(job: TrainJob, model, task: str, data: Encoded, steps: int, total: int) -> dict[str, Any]:
    """Attach ``job``'s delta, run ``steps`` training steps, detach; what they cost."""
    release_freed_memory()
    before = resident_mb()
    exact = reset_peak()
    torch.manual_seed(job.seed)
    trainable, config = _attach(job, model, task)
    try:
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=job.learning_rate)
        settings = job.settings()
        plan = BatchPlan(len(data), job.batch_size, job.seed)
        device = next(model.parameters()).device
        model.train()
        seconds = []
        for step in range(steps):
            rows = widest_rows(data, job.batch_size) if step == 0 else plan.rows(step)
            batch = to_device(data.collate(rows), device)
            began = time.perf_counter()
            _training_step(model, batch, optimizer, params, step, total, settings.grad_clip)
            seconds.append(time.perf_counter() - began)
        peak = peak_memory_mb()
        del optimizer, params
    finally:
        _detach(model, config)
    timed = seconds[1:] or seconds
    return {"trainable": trainable, "step_seconds": statistics.median(timed), "step_seconds_all": seconds,
            "extra_mb": max(0.0, peak - before), "before_mb": before, "peak_reset": exact}


def run_probe(request: dict[str, Any]) -> dict[str, Any]:
    """Everything the plan measures, in this process (see the module docstring).

    ``request``: ``job`` (TrainJob fields), ``candidates`` (``{"method", "options", "default"}``
    each), ``steps`` (probe steps per family, at least 2).
    """
    job = TrainJob(**request["job"])
    began = time.perf_counter()
    splits, loaded = prepare(job)
    model, tokenizer = loaded.model, loaded.tokenizer
    encoded = {name: encode(getattr(splits, name), tokenizer, splits.task, job.max_length, splits.labels)
               for name in ("train", "validation", "test")}
    model.to(distributed.device())
    if job.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    total = total_steps(job.settings(), len(encoded["train"]))
    setup = {"peak_mb": peak_memory_mb(), "resident_mb": resident_mb(), "seconds": time.perf_counter() - began}
    candidates = request["candidates"]
    counts: list[dict[str, Any]] = []
    jobs = []
    for candidate in candidates:
        try:
            candidate_job = dataclasses.replace(job, method=candidate["method"], options=candidate["options"])
            counts.append({"trainable": count_trainable(candidate_job, model, splits.task)})
        except REFUSALS as error:
            candidate_job = None
            counts.append({"refused": str(error), "kind": type(error).__name__})
        jobs.append(candidate_job)
    families: dict[str, dict[str, Any]] = {}
    for candidate, candidate_job, count in zip(candidates, jobs, counts):
        method = candidate["method"]
        if "refused" in count or method in families:
            continue
        default_ok = any(c["method"] == method and c["default"] and "refused" not in n
                         for c, n in zip(candidates, counts))
        if default_ok and not candidate["default"]:
            continue  # the family is probed at its default size
        try:
            families[method] = {"options": candidate["options"],
                                **probe_family(candidate_job, model, splits.task, encoded["train"], request["steps"],
                                               total)}
        except DeltaError as error:  # a delta whose training fails at once: recorded, the others go on
            families[method] = {"options": candidate["options"], "failed": str(error)}
    return {"setup": setup, "total_steps": total, "train_examples": len(encoded["train"]), "task": splits.task,
            "base_parameters": count_parameters(model), "counts": counts, "families": families,
            "probe_steps": request["steps"], "threads": torch.get_num_threads()}


def probe_in_fresh_process(request: dict[str, Any], timeout: float | None = None) -> dict[str, Any]:
    """:func:`run_probe` in a new Python process (so the setup memory is a fresh process's).

    Raises:
        DeltaError: the probe failed; the message carries its last error line.
    """
    with tempfile.TemporaryDirectory(prefix="deltatune-plan-") as folder:
        request_path, result_path = Path(folder) / "request.json", Path(folder) / "result.json"
        request_path.write_text(json.dumps(request))
        child = subprocess.run([sys.executable, "-m", "deltatune.tune.probe", str(request_path), str(result_path)],
                               capture_output=True, text=True, timeout=timeout)
        result = json.loads(result_path.read_text()) if result_path.exists() else None
        if result is None or "error" in result:
            if result is not None:  # bad input (a model, data or option): the same error, raised here
                raise _error_kind(result["kind"])(result["error"])
            lines = [line for line in child.stderr.splitlines() if line.strip()]
            raise DeltaError(f"the plan's probe process failed (exit code {child.returncode}): "
                             f"{lines[-1] if lines else 'no output'}")
        return result


def _error_kind(name: str) -> type[DeltaError]:
    """The :class:`DeltaError` subclass called ``name`` (else DeltaError itself)."""
    pending = [DeltaError]
    while pending:
        kind = pending.pop()
        if kind.__name__ == name:
            return kind
        pending.extend(kind.__subclasses__())
    return DeltaError


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    request_path, result_path = Path(argv[0]), Path(argv[1])
    try:
        result = run_probe(json.loads(request_path.read_text()))
    except DeltaError as error:
        result = {"error": str(error), "kind": type(error).__name__}
    write_text_atomic(result_path, json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
