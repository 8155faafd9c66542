"""The README's quick start runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_quick_start_runs(tmp_path, capsys):
    text = README.read_text()
    block = re.search(r"## Quick start\n\n```python\n(.*?)```", text, re.S).group(1)
    assert len(block.strip().splitlines()) <= 25
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(block, "README quick start", "exec"), {})
    finally:
        os.chdir(cwd)
    assert "trainable" in capsys.readouterr().out
    assert (tmp_path / "runs" / "sentiment" / "delta.json").is_file()



def test_the_methods_table_lists_every_registered_method():
    import deltatune as dt

    section = README.read_text().split("## Methods", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    assert sorted(listed) == sorted(dt.method_names()), "README's Methods table and the registry differ"
    pages = {p.stem for p in (README.parent / "docs" / "methods").glob("*.md")}
    assert pages <= set(dt.method_names()), f"pages for unknown methods: {pages - set(dt.method_names())}"
