"""A method defined outside src/ (tests/plugins/toy_method.py) plugs in through the plugin
mechanism and then works everywhere a built-in method does, with no change to src/:
trained from the CLI with its own flag, compared, saved and loaded, served, stacked in a
composition, merged exactly, and its per-step training hook run by the training loop."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
import transformers

import deltatune as dt
from deltatune.core import registry
from deltatune.serve.background import free_port

PLUGINS = Path(__file__).parent / "plugins"


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, **extra}
    env["PYTHONPATH"] = os.pathsep.join([str(PLUGINS), env.get("PYTHONPATH", "")])
    return env


def _cli(*args: str, plugin: bool = True, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "deltatune.cli", *(["--plugin", "toy_method"] if plugin else []), *args]
    return subprocess.run(command, env=_env(**env), capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def toy_registered():
    """``toy`` registered in this process for the module's tests, then removed again."""
    before = dict(registry._METHODS)
    sys.path.insert(0, str(PLUGINS))
    try:
        dt.load_plugins(["toy_method"])
        yield dt.get_method("toy")
    finally:
        sys.path.remove(str(PLUGINS))
        registry._METHODS.clear()
        registry._METHODS.update(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert) -> Path:
    from conftest import write_reviews

    folder = tmp_path_factory.mktemp("toy")
    data = write_reviews(folder / "reviews.csv")
    done = _cli("train", "--model", str(tiny_bert), "--data", str(data), "--text-column", "review", "--label-column",
                "sentiment", "--method", "toy", "--scale", "0.5",
                "--steps", "4", "--batch-size", "8", "--max-length", "16", "--no-progress", "--out", str(folder / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    return folder


def test_cli_trains_the_plugin_method_with_its_own_flag(trained):
    meta = json.loads((trained / "run" / "delta.json").read_text())
    assert meta["method"] == "toy" and meta["config"]["scale"] == 0.5
    metrics = json.loads((trained / "run" / "metrics.json").read_text())
    assert metrics["method"] == "toy" and metrics["steps"] == 4


def test_help_lists_the_method_and_its_option_only_with_the_plugin():
    def shown(**kwargs) -> str:  # argparse wraps help lines
        return " ".join(_cli("train", "--help", **kwargs).stdout.split())

    # --scale is also hydra's, so the plugin's own meaning of it is what must come and go
    own = "toy: factor s on the rank-one update u v^T"
    with_plugin = shown()
    assert "toy: rank-one update" in with_plugin and own in with_plugin
    assert own not in shown(plugin=False)
    assert own in shown(plugin=False, DELTATUNE_PLUGINS="toy_method")


def test_an_unknown_plugin_is_a_clear_error():
    done = subprocess.run([sys.executable, "-m", "deltatune.cli", "--plugin", "no_such_plugin", "train"],
                          env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "plugin module 'no_such_plugin' cannot be imported" in done.stderr


def test_compare_trains_it_beside_a_built_in_method(trained, tiny_bert):
    out, results = trained / "compare", trained / "results"
    done = _cli("compare", "--methods", "head", "toy", "--model", str(tiny_bert), "--data",
                str(trained / "reviews.csv"), "--text-column", "review", "--label-column", "sentiment", "--steps", "2", "--batch-size", "8", "--max-length", "16",
                "--out", str(out), "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((results / "compare.json").read_text())
    assert [r["method"] for r in rows] == ["head", "toy"]
    assert "| toy |" in (results / "compare.md").read_text()


def _model(folder: Path):
    torch.manual_seed(0)
    return transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()


def _logits(model, tokens):
    with torch.no_grad():
        return model(**tokens).logits


def test_saved_delta_loads_stacks_and_merges_exactly(toy_registered, trained, tiny_bert):
    tokens = transformers.AutoTokenizer.from_pretrained(tiny_bert)(["a good film", "dull"], return_tensors="pt",
                                                                   padding=True)
    model = _model(tiny_bert)
    base = _logits(model, tokens)
    report = dt.load(model, trained / "run", "toy")
    assert report.method == "toy"
    tuned = _logits(model, tokens)
    assert not torch.allclose(tuned, base)
    # stacked with a LoRA in a composition: the same as both active in that order
    dt.attach(model, dt.LoRAConfig(r=2), name="lora", activate=False)
    with torch.no_grad():
        for _, p in dt.delta_parameters(model, "lora"):
            p.add_(0.1)
    with dt.using(model, ["toy", "lora"]):
        expected = _logits(model, tokens)
    with dt.compose(model, dt.Stack("toy", "lora")):
        torch.testing.assert_close(_logits(model, tokens), expected, rtol=0, atol=0)
    # merged: the same outputs; unmerged: the base weights bit for bit
    weights = {k: p.detach().clone() for k, p in dt.base_parameters(model)}
    with dt.using(model, "toy"):
        dt.merge(model)
        torch.testing.assert_close(_logits(model, tokens), tuned, rtol=1e-5, atol=1e-5)
        dt.unmerge(model)
    assert all(torch.equal(p, weights[k]) for k, p in dt.base_parameters(model))


def test_the_training_loop_runs_the_method_step_hook(toy_registered, tiny_bert):
    from deltatune.train.batches import encode
    from deltatune.train.loop import Settings, train
    from deltatune.data.datasets import Example

    model = _model(tiny_bert)
    dt.attach(model, toy_registered.config_class(modules_to_save=("classifier",)), name="toy")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert)
    data = encode([Example(f"text {i}", "ab"[i % 2]) for i in range(16)], tokenizer, "classification", 12, ["a", "b"])
    train(model, data, Settings(steps=3, batch_size=8, lr=1e-3, progress=False))
    from toy_method import STEPS_SEEN

    assert STEPS_SEEN["toy"] == [(1, 3), (2, 3), (3, 3)]


@contextlib.contextmanager
def _server(tiny_bert: Path, deltas: Path):
    port = free_port("127.0.0.1")
    command = [sys.executable, "-m", "deltatune.cli", "--plugin", "toy_method", "serve", "--model", str(tiny_bert),
               "--deltas", str(deltas), "--port", str(port), "--log-level", "warning"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.stderr.read()[-3000:]
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_server_serves_the_plugin_method(toy_registered, trained, tiny_bert):
    deltas = trained / "library"
    deltas.mkdir(exist_ok=True)
    for name in ("delta.json", "delta.safetensors"):
        (deltas / "toy").mkdir(exist_ok=True)
        (deltas / "toy" / name).write_bytes((trained / "run" / name).read_bytes())
    model = _model(tiny_bert)
    dt.load(model, deltas / "toy", "toy")
    tokens = transformers.AutoTokenizer.from_pretrained(tiny_bert)(["a good film"], return_tensors="pt")
    expected = torch.softmax(_logits(model, tokens), -1)[0].tolist()
    with _server(tiny_bert, deltas) as url:
        answer = httpx.post(url + "/v1/classify", json={"delta": "toy", "inputs": ["a good film"]}, timeout=60)
        assert answer.status_code == 200, answer.text
        probabilities = list(answer.json()["results"][0]["probabilities"].values())
    assert probabilities == pytest.approx(expected, abs=1e-5)
