"""Every run default is defined once, in ``RunConfig``: the CLI flags, ``config.default.toml``,
``TrainConfig`` and the run's ``EvalConfig`` agree with it field by field."""

import tomllib
from dataclasses import asdict
from importlib.resources import files

import pytest
import typer

from cdelta import cli
from cdelta.config import RunConfig
from cdelta.edit.train import TrainConfig, train_config
from cdelta.evaluate import EvalConfig, eval_config

DEFAULTS = RunConfig()

# flag (click parameter name) -> RunConfig field, per command
FLAGS = {
    "run": {name: name for name in (
        "model", "category", "direction", "circuit", "variant", "gate_span", "gate_layer", "steps", "k", "search", "search_trials",
        "controls", "train_contexts", "refusal_openings", "n_pairs", "seed", "device", "dtype", "device_map", "max_memory_mb", "trust_remote_code")}
    | {"context": "eval_contexts"},
    "eval": {"model": "model", "judge": "judge", "limit_per_category": "eval_limit", "max_new_tokens": "max_new_tokens",
             "batch_size": "eval_batch_size", "mmlu_n": "mmlu_n", "seed": "seed", "device": "device", "dtype": "dtype",
             "device_map": "device_map", "trust_remote_code": "trust_remote_code"},
    "localize": {"model": "model", "category": "category", "n_pairs": "n_pairs", "method": "method", "steps": "ig_steps",
                 "metric": "localize_metric", "contrast": "contrast", "selection": "circuit", "faithfulness": "faithfulness",
                 "max_memory_mb": "max_memory_mb", "seed": "seed", "device": "device", "dtype": "dtype", "device_map": "device_map",
                 "trust_remote_code": "trust_remote_code"},
    "compare": {"model": "model", "category": "category", "max_new_tokens": "max_new_tokens", "limit_per_category": "eval_limit",
                "mmlu_n": "mmlu_n", "seed": "seed", "device": "device", "dtype": "dtype", "device_map": "device_map"},
}
# flags whose help is their own (wording for a comma-separated or single value, or more choices than the field's)
OWN_HELP = {("run", "category"), ("run", "controls"), ("run", "context"), ("run", "train_contexts"), ("localize", "method"),
            ("compare", "max_new_tokens"), ("eval", "context"), ("compare", "context"), ("localize", "category"), ("compare", "category")}


def _params(command: str) -> dict:
    group = typer.main.get_command(cli.app)
    return {p.name: p for p in group.commands[command].params}


def _as_run_value(field: str, value):
    """A single-category command's default as the RunConfig value it stands for."""
    return [value] if field == "category" else value


@pytest.mark.parametrize("command", ["eval", "localize", "compare"])
def test_command_defaults_are_run_config_defaults(command):
    params = _params(command)
    for flag, field in FLAGS[command].items():
        assert _as_run_value(field, params[flag].default) == getattr(DEFAULTS, field), (command, flag)
        if (command, flag) not in OWN_HELP:
            assert params[flag].help == RunConfig.model_fields[field].description, (command, flag)


def test_localize_contrast_default_is_run_configs():
    assert _params("localize")["contrast"].default == DEFAULTS.contrast == "auto"


def test_run_flags_are_unset_by_default_and_show_run_config_defaults():
    params = _params("run")
    for flag, field in FLAGS["run"].items():
        param, default = params[flag], getattr(DEFAULTS, field)
        assert param.default in (None, ()), flag  # None: not given, so a --config file's value applies (make_config)
        shown = cli._shown(default) if default not in (None, []) else False
        assert param.show_default == shown, flag
        if ("run", flag) not in OWN_HELP:
            assert param.help == RunConfig.model_fields[field].description, flag


def test_toml_cli_and_run_config_agree_field_by_field():
    toml = tomllib.loads((files("cdelta") / "config.default.toml").read_text())["run"]
    unset = {name for name, field in RunConfig.model_fields.items() if field.default is None}
    assert set(toml) | unset == set(RunConfig.model_fields)
    for name, field in RunConfig.model_fields.items():
        assert toml.get(name) == field.default, name
    for command, flags in FLAGS.items():
        params = _params(command)
        for flag, field in flags.items():
            cli_default = params[flag].show_default if command == "run" else _as_run_value(field, params[flag].default)
            expected = toml.get(field)
            if command == "run":
                expected = cli._shown(expected) if expected not in (None, []) else False
            assert cli_default == expected, (command, flag)


def test_train_config_defaults_are_run_configs():
    assert TrainConfig() == train_config(DEFAULTS)
    train = asdict(TrainConfig())
    for name in ("steps", "lr", "batch_size", "retain_weight", "first_token_weight", "seed"):
        assert train[name] == getattr(DEFAULTS, name), name


def test_eval_config_of_a_default_run_matches_it():
    evaluation = eval_config(DEFAULTS)
    assert (evaluation.split, evaluation.judge, evaluation.max_new_tokens, evaluation.batch_size, evaluation.limit_per_category,
            evaluation.mmlu_n, evaluation.seed, list(evaluation.contexts)) == (
        "test", DEFAULTS.judge, DEFAULTS.max_new_tokens, DEFAULTS.eval_batch_size, DEFAULTS.eval_limit, DEFAULTS.mmlu_n,
        DEFAULTS.seed, DEFAULTS.eval_contexts)


def test_bare_eval_config_defaults_are_the_runs():
    assert eval_config(DEFAULTS) == EvalConfig()
