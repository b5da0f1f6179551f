"""The run configs that the docs (results and notebook) cite are valid run settings."""

from pathlib import Path

import pytest

from cdelta.config import check_targets, load_config_file, make_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.toml"))


def test_the_docs_cite_only_committed_configs():
    root = Path(__file__).parent.parent / "docs"
    docs = "\n".join(p.read_text() for p in [root / "results.md", *sorted((root / "notebook").glob("*.md"))])
    cited = {line.split("--config ")[1].split()[0] for line in docs.splitlines() if "--config configs/" in line}
    assert cited and cited <= {f"configs/{p.name}" for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_builds_a_run_config(path):
    cfg = make_config(load_config_file(path), {})
    check_targets(cfg.category, cfg.direction)
    assert cfg.model in ("smollm2-135m", "qwen2.5-0.5b")
