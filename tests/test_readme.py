"""The README's Python examples run as they are, so the README cannot drift from the code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _first_python_block(section: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {section}\n")
    block = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert block, f"no python block under '## {section}'"
    return block.group(1)


@pytest.mark.parametrize("section,max_lines", [("Python API", 30), ("Write a pass", 25)])
def test_readme_example_runs(section, max_lines, tmp_path, monkeypatch):
    code = _first_python_block(section)
    body = [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert len(body) <= max_lines, f"the {section} example grew to {len(body)} lines"
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md ({section})", "exec"), {"__name__": "readme_example"})
    if section == "Python API":
        assert {"model.py", "weights.pt", "model.onnx"} <= {p.name for p in (tmp_path / "runs" / "my-net").iterdir()}

