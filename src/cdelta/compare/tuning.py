"""Helpers of the selective-tuning baselines (NeST, SafeSeek): settings from options, the
refusal edit data, a cached unscaled edit, and its scale k chosen on the validation split
by C-Δθ's rule. Each method tunes its own parameter selection toward refusal replies on the
target category's train prompts, with the base's own replies on C-Δθ's retain prompts.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

from cdelta.compare.base import MethodContext, MethodResult
from cdelta.compare.shared import cached, edited_copy, prompts_digest, shared_dir
from cdelta.config import RunConfig, make_config
from cdelta.edit.delta import Delta, apply_to_model, compose, load_sparse, save_sparse
from cdelta.edit.train import EditData
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_json
from cdelta.stages import fingerprint

TUNING_DIR = "selective-tuning"
"""Subdirectory of the shared directory holding the retain replies NeST and SafeSeek share."""


def run_config(context: MethodContext) -> RunConfig:
    """C-Δθ's defaults for this model, category and seed, overridden by ``RunConfig`` options."""
    chosen = {k: v for k, v in context.options.items() if k in RunConfig.model_fields}
    return make_config({}, {**chosen, "model": context.lm.name, "category": [context.category], "seed": context.seed})


def method_config(cls, context: MethodContext, prefix: str):
    """An instance of the dataclass ``cls`` from ``prefix.<field>`` options (``seed`` = the run's)."""
    known = {f.name: f.default for f in fields(cls)}
    values = {}
    for key, value in context.options.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix) :]
        if name not in known:
            raise CdeltaError(f"unknown option {key!r}", f"use one of: {', '.join(prefix + n for n in known)}")
        default = known[name]
        numeric = isinstance(default, (int, float)) and not isinstance(default, bool)
        values[name] = type(default)(value) if numeric else value
    return cls(**{"seed": context.seed, **values})


def probe_prompts(context: MethodContext) -> tuple[list[str], list[str]]:
    """Train-split target-category prompts and as many harmless ones (seeded sample)."""
    target = context.prompts.filter(split="train", category=context.category)
    harmless = context.prompts.filter(split="train", kind="harmless").sample(len(target), context.seed)
    return target.texts(), harmless.texts()


def refusal_edit_data(context: MethodContext, cfg: RunConfig) -> EditData:
    """Refusal replies for the target's train prompts; the base's own replies on retain prompts (cached, shared)."""
    from cdelta.edit.data import RETAIN_REPLY_TOKENS, own_reply_pairs
    from cdelta.edit.data import refusal_edit_data as edit_data

    lm = context.lm

    def retain_replies(retain_set) -> list[tuple[str, str]]:
        key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed, "ids": [p.id for p in retain_set], "prompts": prompts_digest(retain_set)}

        def compute(path: Path) -> list[tuple[str, str]]:
            pairs = own_reply_pairs(lm.model, lm.tokenizer, retain_set, RETAIN_REPLY_TOKENS)
            atomic_write_json(path, pairs)
            return pairs

        def load(path: Path) -> list[tuple[str, str]]:
            return [tuple(pair) for pair in json.loads(path.read_text())]

        return cached(shared_dir(context) / TUNING_DIR, "retain", key, "retain.json", compute, load, context.log)

    return edit_data(context.prompts, cfg, retain_replies)


def cached_edit(context: MethodContext, name: str, key: dict, build: Callable[[], tuple[Delta, dict]]) -> tuple[Delta, dict]:
    """``build()``'s (unscaled delta, JSON summary), stored in ``out_dir/<name>/`` and reused while ``key`` holds."""

    def compute(path: Path) -> tuple[Delta, dict]:
        delta, summary = build()
        path.mkdir(parents=True, exist_ok=True)
        save_sparse(delta, path / "delta.safetensors", {"stage_key": fingerprint(key)})
        atomic_write_json(path / "summary.json", summary)
        return delta, summary

    def load(path: Path) -> tuple[Delta, dict]:
        return load_sparse(path / "delta.safetensors")[0], json.loads((path / "summary.json").read_text())

    return cached(context.out_dir, name, key, name, compute, load, context.log, context.refit)


def scale_on_val(context: MethodContext, cfg: RunConfig, raw: Delta, key: dict) -> dict:
    """k for ``raw`` on the validation split by C-Δθ's rule (``select_k.choose_k``), cached; ``cfg.k`` if given."""
    from cdelta.judge import get_judge
    from cdelta.edit.select_k import KL_LIMIT, choose_k, validation_prompts

    def compute(path: Path) -> dict:
        if cfg.k is not None:
            info = {"k": cfg.k, "rule": "given"}
        else:
            val = validation_prompts(context.prompts, [context.category], cfg.seed)
            info = choose_k(context.lm, raw, val, cfg.k_grid, cfg, get_judge(cfg.judge), context.log)
        atomic_write_json(path, info)
        return info

    k_key = {**key, "k": cfg.k, "k_grid": cfg.k_grid, "judge": cfg.judge, "kl_limit": KL_LIMIT}
    return cached(context.out_dir, "choose-k", k_key, "k_selection.json", compute, lambda path: json.loads(path.read_text()), context.log, context.refit)


def scaled_result(context: MethodContext, raw: Delta, k_info: dict, info: dict) -> MethodResult:
    """A copy of the base with ``k · raw`` added; ``params_touched`` = its changed entries."""
    delta = compose(raw, None, k_info["k"])
    model, touched = edited_copy(context.lm.model, lambda m: apply_to_model(m, delta))
    return MethodResult(model=model, params_touched=touched, info={**info, "k": k_info["k"], "k_selection": k_info})
