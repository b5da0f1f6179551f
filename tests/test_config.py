"""TOML config files mirror the CLI flags; flags override the file."""

import sys
import tomllib
from importlib.resources import files

import pytest

from cdelta import cli
from cdelta.config import RunConfig, make_config
from cdelta.errors import CdeltaError


def test_default_config_lists_every_setting_with_its_default():
    data = tomllib.loads((files("cdelta") / "config.default.toml").read_text())["run"]
    defaults = RunConfig()
    optional = {name for name, field in RunConfig.model_fields.items() if field.default is None}
    assert set(data) | optional == set(RunConfig.model_fields)
    for key, value in data.items():
        assert getattr(defaults, key) == value, key


def test_flags_override_file_and_bad_values_are_clear():
    cfg = make_config({"steps": 10, "lr": 0.5}, {"steps": 3, "lr": None})
    assert (cfg.steps, cfg.lr) == (3, 0.5)
    with pytest.raises(CdeltaError, match="steps"):
        make_config({"steps": 0}, {})
    with pytest.raises(CdeltaError, match="no_such_key"):
        make_config({"no_such_key": 1}, {})


def _write_toml(path, values: dict) -> None:
    def render(v):
        if isinstance(v, str):
            return f'"{v}"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return "[" + ", ".join(render(x) for x in v) + "]"
        return repr(v)

    path.write_text("[run]\n" + "".join(f"{k} = {render(v)}\n" for k, v in values.items()))


def test_config_file_reproduces_cli_run_byte_for_byte(tiny_llama_dir, tmp_path, monkeypatch):
    shared = dict(
        model=str(tiny_llama_dir), n_pairs=4, ig_steps=2, lr=1e-3, k_grid=[1.0], retain_harmless=4,
        retain_lookalike=4, retain_other=1, max_new_tokens=4, mmlu_n=4, eval_limit=2, faithfulness=False, judge="marker",
    )
    _write_toml(tmp_path / "full.toml", {**shared, "steps": 3, "seed": 1, "circuit": "top_k:3"})
    _write_toml(tmp_path / "partial.toml", shared)
    for args in (
        ["--config", str(tmp_path / "full.toml"), "--out", str(tmp_path / "from_file")],
        ["--config", str(tmp_path / "partial.toml"), "--steps", "3", "--seed", "1", "--circuit", "top_k:3", "--out", str(tmp_path / "from_flags")],
    ):
        monkeypatch.setattr(sys, "argv", ["cdelta", "--quiet", "run", *args])
        with pytest.raises(SystemExit) as done:
            cli.main()
        assert done.value.code == 0
    a = (tmp_path / "from_file" / "delta.safetensors").read_bytes()
    assert a == (tmp_path / "from_flags" / "delta.safetensors").read_bytes()


def test_gate_span_flag_reaches_the_run_config(monkeypatch, tmp_path):
    import cdelta.pipeline

    seen = {}

    def fake_run(cfg, out_dir, log):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(cdelta.pipeline, "run_pipeline", fake_run)
    monkeypatch.setattr(sys, "argv", ["cdelta", "--quiet", "run", "--variant", "gated", "--gate-span", "4", "--out", str(tmp_path / "r")])
    with pytest.raises(SystemExit):
        cli.main()
    assert seen["cfg"].variant == "gated" and seen["cfg"].gate_span == 4
