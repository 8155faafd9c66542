"""Checkpoints: a run killed with SIGKILL resumes to the same delta as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import safetensors.torch
import torch

from conftest import write_reviews


def _command(model, data, out, *extra):
    return [sys.executable, "-m", "deltatune.cli", "train", "--model", str(model), "--data", str(data),
            "--text-column", "review", "--label-column", "sentiment", "--method", "lora", "--steps", "400",
            "--batch-size", "8", "--max-length", "16", "--save-every", "25", "--no-progress", "--out", str(out), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def test_resume_after_kill_matches_an_uninterrupted_run(tmp_path, tiny_bert):
    data = write_reviews(tmp_path / "reviews.csv", rows=200)
    killed = tmp_path / "killed"
    process = subprocess.Popen(_command(tiny_bert, data, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoint" / "latest.json"
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if latest.exists() and json.loads(latest.read_text())["step"] >= 50:
            break
        time.sleep(0.02)
    assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()[-2000:]}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    step = json.loads(latest.read_text())["step"]
    assert 50 <= step < 400 and not (killed / "metrics.json").exists()

    resumed = subprocess.run([sys.executable, "-m", "deltatune.cli", "train", "--resume", str(killed), "--no-progress"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = subprocess.run(_command(tiny_bert, data, tmp_path / "straight"), env=_env(), capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-2000:]

    a = safetensors.torch.load_file(str(killed / "delta.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "straight" / "delta.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    history = json.loads((killed / "history.json").read_text())
    assert [s for s, _ in history["train"]] == list(range(1, 401))


def test_resume_without_a_checkpoint_is_a_clear_error(tmp_path, tiny_bert, capsys):
    from deltatune.cli import main

    assert main(["train", "--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume takes the --out folder" in capsys.readouterr().err
