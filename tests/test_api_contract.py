"""The API contract is exact: schemathesis (``--checks all``) against live servers finds nothing.

Two servers on loopback: a causal LM with a chat template (completions, chat, models, admin)
and a classifier (classify). The checks' configuration, and why two checks accept 413, is in
``tests/contract/schemathesis.toml``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import save_random_deltas

import deltatune as dt
from deltatune.serve import DeltaLibrary, Settings, create_app, engine_from_options, load_base
from deltatune.serve.background import running

CONFIG = Path(__file__).parent / "contract" / "schemathesis.toml"
TOKEN = "contract-token"
TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}{% if add_generation_prompt %}a {% endif %}"


def _serve(folder: Path, deltas: Path, configs: dict):
    model, tokenizer, _ = load_base(str(folder), DeltaLibrary(deltas))
    save_random_deltas(model, deltas, configs)
    engine = engine_from_options(str(folder), deltas)
    return create_app(engine, Settings(max_tokens=8, max_inputs=4, timeout_s=20, admin_token=TOKEN))


def _schemathesis(url: str, tmp_path: Path) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "schemathesis"), "--config-file", str(CONFIG), "run",
               f"{url}/openapi.json", "--checks", "all", "--max-examples", "25", "--seed", "7", "--workers", "1",
               "-H", f"Authorization: Bearer {TOKEN}", "--report-dir", str(tmp_path / "report")]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # its cache stays there


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_schemathesis_finds_no_failure(kind, tiny_llama, tiny_bert, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama if kind == "llama" else tiny_bert, folder)
    if kind == "llama":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.chat_template = TEMPLATE
        tokenizer.save_pretrained(folder)
    (tmp_path / "deltas").mkdir()
    app = _serve(folder, tmp_path / "deltas", {"lora": dt.LoRAConfig(r=2), "ia3": dt.IA3Config()})
    with running(app) as url:
        done = _schemathesis(url, tmp_path)
    summary = done.stdout[done.stdout.find("SUMMARY"):]
    assert done.returncode == 0, done.stdout[-8000:] + done.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", summary)
    assert tested and int(tested.group(1)) >= (6 if kind == "llama" else 4), summary  # the routes were exercised
    assert "generated" in summary and " 0 generated" not in summary, summary
