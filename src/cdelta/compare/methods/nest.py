"""NeST (Neuron Selective Tuning): tune only the target category's safety neurons.

Safety neurons are found on the train split (target-category harmful vs as many harmless
prompts), clustered, and tuned toward refusal replies with the same retain data and
steps as C-Δθ but NeST's own learning rate (``NestConfig.lr``; ``cdelta.baselines.nest``);
the scale k of the update is chosen on the validation split with C-Δθ's rule. Options:
any ``RunConfig`` field (``steps``, ``k``, ``judge``...) and ``nest.<field>`` for
``NestConfig`` (``nest.z_threshold``, ``nest.max_neurons``, ``nest.n_clusters``,
``nest.tie``, ``nest.lr``).

The helpers below (settings from options, refusal edit data, k on val) are shared with
SafeSeek's circuit tuning (``compare.methods.safeseek``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import fields, replace
from pathlib import Path

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached, edited_copy, prompts_digest, shared_dir
from cdelta.config import RunConfig, make_config
from cdelta.edit.delta import Delta, apply_to_model, compose, load_sparse, save_sparse
from cdelta.edit.train import EditData
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_json
from cdelta.models.architecture import architecture_of
from cdelta.baselines.nest import NestConfig, find_safety_neurons, nest_delta
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
    from cdelta.edit.data import own_reply_pairs, refusal_pairs, retain_prompts

    lm = context.lm
    retain_set = retain_prompts(context.prompts, [context.category], cfg.retain_counts(), cfg.seed)
    key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed, "ids": [p.id for p in retain_set], "prompts": prompts_digest(retain_set)}

    def compute(path: Path) -> list[tuple[str, str]]:
        pairs = own_reply_pairs(lm.model, lm.tokenizer, retain_set, 16)
        atomic_write_json(path, pairs)
        return pairs

    def load(path: Path) -> list[tuple[str, str]]:
        return [tuple(pair) for pair in json.loads(path.read_text())]

    retain = cached(shared_dir(context) / TUNING_DIR, "retain", key, "retain.json", compute, load, context.log)
    target = context.prompts.filter(split="train", category=context.category)
    return EditData(refusal_pairs(target, context.category, cfg.seed), retain)


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
    """k for ``raw`` on the validation split by C-Δθ's rule (``pipeline.choose_k``), cached; ``cfg.k`` if given."""
    from cdelta.judge import get_judge
    from cdelta.pipeline import KL_LIMIT, choose_k, validation_prompts

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


def fit(context: MethodContext) -> MethodResult:
    """Safety neurons on train, NeST tuning, k on val."""
    cfg = run_config(context)
    nest = method_config(NestConfig, context, "nest.")
    lm = context.lm
    data = refusal_edit_data(context, cfg)
    target, harmless = probe_prompts(context)
    train = replace(cfg.train_config(), lr=nest.lr)
    key = {"model_sha256": lm.weights_sha256, "category": context.category, "nest": vars(nest), "train": vars(train),
           "probe": [target, harmless], "data": fingerprint([data.target, data.retain])}

    def build() -> tuple[Delta, dict]:
        neurons = find_safety_neurons(lm.model, lm.tokenizer, target, harmless, nest)
        context.log(f"nest: {len(neurons.ids())} neurons in {neurons.n_clusters} clusters")
        return nest_delta(lm.model, lm.tokenizer, neurons, data, train, tie=nest.tie), neurons.to_dict()

    raw, summary = cached_edit(context, "nest-edit", key, build)
    k_info = scale_on_val(context, cfg, raw, {"edit": fingerprint(key)})
    n_neurons, n_clusters = len(summary["neurons"]), summary["n_clusters"]
    info = {"n_neurons": n_neurons, "n_clusters": n_clusters, "neurons_by_layer": _by_layer(summary["neurons"]),
            "trained_params": (n_clusters if nest.tie else n_neurons) * 3 * architecture_of(lm.model).d_model, "nest": vars(nest)}
    return scaled_result(context, raw, k_info, info)


def _by_layer(ids: list[str]) -> dict[str, int]:
    """Count of neuron ids per layer (``{"L12": 5, ...}``)."""
    counts: dict[str, int] = {}
    for node in ids:
        layer = node.partition(".")[0]
        counts[layer] = counts.get(layer, 0) + 1
    return counts


METHOD = Method("nest", "NeST: tune only clustered safety neurons (shared per-cluster updates), k chosen on val", fit)
