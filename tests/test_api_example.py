"""The docs' Python API example runs as written (on the bundled SmolLM2)."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

DOC = Path(__file__).resolve().parents[1] / "docs" / "usage.md"


def test_usage_example_runs_as_written(tmp_path, monkeypatch):
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(DOC), "exec"), namespace)
    results = namespace["results"]
    assert (tmp_path / "runs" / "api-example" / "checkpoint" / "config.json").is_file()
    assert (tmp_path / "runs" / "api-example" / "delta.safetensors").is_file()
    assert results["sets"]["builtin"]["cybercrime"]["n"] == 2
