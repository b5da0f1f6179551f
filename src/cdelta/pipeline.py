"""The main job, ``cdelta run``: localize → build edit data → train → select k → export → evaluate → report.

Each numbered step below is a call into a library module; every stage writes its artifact
into the run directory and is skipped on a rerun whose inputs are unchanged (see
``stages.run_stage``). ``build_edit`` runs the steps up to the scaled ΔθC (used by
``cdelta compare`` too); ``run_pipeline`` adds export, evaluation, controls and the report.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.circuits.circuit import random_circuit_like
from cdelta.config import RunConfig, check_targets, default_of
from cdelta.data.prompts import PromptSet
from cdelta.data.public import check_trainable
from cdelta.data.runs import eval_sets, run_prompts
from cdelta.edit.data import in_contexts, run_edit_data
from cdelta.edit.delta import Delta, apply_to_model, compose, load_sparse, save_sparse
from cdelta.edit.export import export_edit, write_model_card
from cdelta.edit.gate import GATE_RECIPE
from cdelta.edit.gate_host import chosen_host_layer, random_host_layer
from cdelta.edit.masks import all_masks, changed_entries, circuit_masks, mask_entries
from cdelta.edit.select_k import KL_LIMIT, choose_k, validation_prompts
from cdelta.edit.train import EditData
from cdelta.edit.variants import train_delta
from cdelta.errors import CdeltaError
from cdelta.evaluate import eval_config, evaluate_model
from cdelta.io import atomic_write_json, provenance
from cdelta.models.loading import LoadedModel, load_model
from cdelta.stages import base_evaluation, file_digest, fingerprint, locks_run_dir, prompts_digest, run_stage

Log = Callable[[str], None]


@dataclass
class BuiltEdit:
    """ΔθC and what produced it: the output of ``build_edit``.

    ``delta`` is already scaled by the chosen ``k``; ``raw`` is the unscaled one;
    ``circuit`` is the selection spec used (``cfg.circuit``, or the search's pick).
    ``masks`` are the circuit's boolean parameter masks (name → tensor of the
    parameter's shape); for the gated variant, the entries ΔθC changes, ``host`` is
    the layer of its MLP and ``gate_val`` the validation prompts an automatic gate
    threshold is chosen on.
    """

    delta: Delta
    raw: Delta
    k: float
    k_info: dict
    masks: dict[str, torch.Tensor]
    circuits: list
    contrasts: dict
    data: EditData
    contrast_data: EditData | None
    edit_key: dict
    circuit: str
    search: dict | None = None
    timings: dict[str, float] = field(default_factory=dict)
    host: int | None = None
    gate_val: PromptSet | None = None

    @property
    def params_touched(self) -> int:
        """Parameter entries the circuit may change (the masks' true entries)."""
        return mask_entries(self.masks)

    @property
    def circuit_nodes(self) -> list[str]:
        """The nodes ΔθC changes: the circuit's, or the gated variant's host MLP."""
        if self.host is not None:
            return [f"L{self.host}.MLP"]
        return sorted({n for c in self.circuits for n in c.nodes})


def build_edit(cfg: RunConfig, run_dir: Path, lm: LoadedModel, log: Log = print, prompts: PromptSet | None = None) -> BuiltEdit:
    """Localize, train and scale ΔθC (resumable stages in ``run_dir``), without exporting or evaluating."""
    from cdelta.circuits.localize import localize_targets
    from cdelta.judge import get_judge

    check_targets(cfg.category, cfg.direction)
    prompts = prompts or run_prompts(cfg.category, cfg.pairs, cfg.domain)
    check_trainable(prompts)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed}
    timings: dict[str, float] = {}

    # 1. localize: one circuit per target category, united
    clock = time.perf_counter()
    circuits, contrasts = localize_targets(cfg, run_dir, lm, prompts, base_key, log)
    timings["localize"] = time.perf_counter() - clock

    # 2. edit data: the base model's own replies to retain; target replies to learn
    clock = time.perf_counter()
    judge = get_judge(cfg.judge)
    data, contrast_data = run_edit_data(cfg, run_dir, lm, prompts, base_key, judge, log)
    timings["data"] = time.perf_counter() - clock

    # 3. train: circuit-restricted ΔθC (before scaling by k), one per circuit size tried (edit.variants)
    edit_fields = {"variant", "direction", "steps", "lr", "batch_size", "retain_weight", "first_token_weight", "category"}
    for optional in ("train_contexts", "refusal_openings"):  # absent when default, so older run directories keep their key
        if getattr(cfg, optional) != default_of(optional):
            edit_fields.add(optional)
    edit_key = {**base_key, "circuits": [file_digest(run_dir / "localize" / c / "circuit.json") for c in cfg.category],
                "retain": file_digest(run_dir / "retain.json"), **cfg.model_dump(include=edit_fields)}
    if cfg.direction == "lift":
        edit_key["lift_target"] = file_digest(run_dir / "lift_target.json")
    if cfg.variant == "gated":
        edit_key.update(gate_neurons=cfg.gate_neurons, gate_threshold=cfg.gate_threshold, gate_span=cfg.gate_span,
                        own_target=file_digest(run_dir / "own_target.json"), gate_recipe=GATE_RECIPE)
        if cfg.gate_layer is not None:  # absent when unset, so run directories made before the option keep their key
            edit_key["gate_layer"] = cfg.gate_layer
    # k is chosen on a capped sample (it generates); an automatic gate threshold on every
    # validation prompt (forward passes only: 8 prompts of a category cannot steer it)
    val = validation_prompts(prompts, cfg.category, cfg.seed)
    gate_val = in_contexts(prompts.filter(split="val"), prompts, cfg.train_contexts, "val", cfg.seed)  # selection sees val contexts
    if cfg.variant == "gated" and cfg.gate_threshold == "auto":
        edit_key["gate_val"] = prompts_digest(gate_val)

    def selected_for(size: str) -> list:
        return [c.select_spec(size, lm.model) for c in circuits]

    def host_of(selected: list) -> int:
        return chosen_host_layer(cfg, selected, lm.model.config.num_hidden_layers)

    def train(size: str) -> Delta:
        selected = selected_for(size)
        if cfg.variant == "gated":  # the host MLP, not the circuit's parameters, is edited
            return train_delta(lm, {}, data, cfg, contrast_data, f"circuit {size}", host_of(selected), gate_val, log)
        return train_delta(lm, circuit_masks(selected, lm.model), data, cfg, contrast_data, f"circuit {size}")

    def train_for(size: str) -> Delta:
        key = {**edit_key, "circuit": size}
        name = "delta_unscaled.safetensors" if size == cfg.circuit else f"edits/{_slug(size)}.safetensors"
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        return run_stage(
            run_dir, f"edit-{size}", key, [name],
            lambda: _save_delta(run_dir / name, train(size), key),
            lambda: load_sparse(run_dir / name)[0], log,
        )

    # 4. select k (and the circuit size) on the validation split: Optuna search (edit.search), or the k grid at cfg.circuit (edit.select_k)
    clock = time.perf_counter()
    search = None
    if cfg.search:
        from cdelta.edit.search import search_edit, validation_evaluator

        if cfg.direction != "refuse":
            raise CdeltaError("the circuit-size search optimizes refusal of the target (direction refuse) only",
                              "set search = false for direction lift (k is then chosen on the k grid)")
        evaluate = validation_evaluator(lm.model, lm.tokenizer, val, judge, cfg.category, cfg.eval_batch_size)
        result = search_edit(train_for, evaluate, cfg.search_sizes, cfg.k_range, cfg.search_trials, cfg.seed, log,
                             storage=run_dir / "search.db", context={"edit": fingerprint(edit_key), "direction": cfg.direction})
        search = result.to_json()
        _write_json(run_dir / "search.json", search)
        size, k_info = result.size, {"k": result.k, "rule": "search", "size": result.size}
        raw = train_for(size)
    else:
        size = cfg.circuit
        k_key = {**edit_key, "circuit": size, "k": cfg.k, "k_grid": cfg.k_grid, "judge": cfg.judge, "kl_limit": KL_LIMIT}
        raw = train_for(size)
        k_info = run_stage(
            run_dir, "choose-k", k_key, ["k_selection.json"],
            lambda: _write_json(run_dir / "k_selection.json", {"k": cfg.k, "rule": "given"} if cfg.k is not None
                                else choose_k(lm, raw, val, cfg.k_grid, cfg, judge, log)),
            lambda: json.loads((run_dir / "k_selection.json").read_text()), log,
        )
    selected = selected_for(size)
    if cfg.variant == "gated":
        host, masks = host_of(selected), changed_entries(raw)
    else:
        host, masks = None, circuit_masks(selected, lm.model)
    timings["edit_and_select"] = time.perf_counter() - clock
    return BuiltEdit(compose(raw, None, k_info["k"]), raw, k_info["k"], k_info, masks, selected, contrasts,
                     data, contrast_data, {**edit_key, "circuit": size}, size, search, timings, host, gate_val)


def build_control(cfg: RunConfig, run_dir: Path, lm: LoadedModel, built: BuiltEdit, kind: str, log: Log = print) -> tuple[Delta, dict]:
    """The control edit ``kind`` (random: an equal-size random circuit; full: all parameters).

    Trained with the same data and settings as ``built`` and scaled by the same k;
    stored in ``run_dir/controls/KIND/delta.safetensors``. Returns (delta, description).
    """
    if kind == "random":
        if cfg.variant == "gated":
            host = random_host_layer(built.circuits, built.host, cfg.seed + 1)
            masks, info = {}, {"nodes": [f"L{host}.MLP"]}
        else:
            randoms = [random_circuit_like(c, cfg.seed + 1) for c in built.circuits]
            host, masks = None, circuit_masks(randoms, lm.model)
            info = {"nodes": sorted(n for c in randoms for n in c.nodes)}
    elif kind == "full":
        host, masks, info = None, all_masks(lm.model), {"nodes": "all parameters"}
    else:
        raise ValueError(f"unknown control {kind!r}")
    sub = run_dir / "controls" / kind
    sub.mkdir(parents=True, exist_ok=True)
    key = {**built.edit_key, "control": kind, "k": built.k}
    delta = run_stage(
        sub, f"control-{kind}", key, ["delta.safetensors"],
        lambda: _save_delta(sub / "delta.safetensors", compose(train_delta(lm, masks, built.data, cfg, built.contrast_data, kind, host,
                                                                            built.gate_val, log), None, built.k), key),
        lambda: load_sparse(sub / "delta.safetensors")[0], log,
    )
    if host is not None:
        masks = changed_entries(delta)
    return delta, {**info, "params_touched": mask_entries(masks)}


@locks_run_dir
def run_pipeline(cfg: RunConfig, run_dir: Path, log: Log = print) -> dict:
    """Run (or resume) the whole job; returns the results written to ``results.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, device_map=cfg.device_map)
    timings: dict[str, float] = {"load": time.perf_counter() - clock}
    built = build_edit(cfg, run_dir, lm, log)  # steps 1-4
    timings.update(built.timings)

    # 5. export: the drop-in checkpoint and the sparse ΔθC (edit.export)
    clock = time.perf_counter()
    manifest = {
        "category": ",".join(cfg.category), "direction": cfg.direction, "k": built.k, "seed": cfg.seed, "variant": cfg.variant,
        "circuit": {"selection": built.circuit, "nodes": built.circuit_nodes, "method": cfg.method},
    }
    manifest = export_edit(lm, built.delta, run_dir, manifest)
    timings["export"] = time.perf_counter() - clock

    # 6. evaluate the base and the exported checkpoint (loaded fresh, as users will), then the controls (evaluate)
    clock = time.perf_counter()
    eval_cfg = eval_config(cfg)
    sets = eval_sets(cfg.eval_prompts)
    eval_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed, "eval": vars(eval_cfg), "sets": cfg.eval_prompts}
    base_results = run_stage(
        run_dir, "eval-base", eval_key, ["results_base.json"],
        lambda: _write_json(run_dir / "results_base.json", base_evaluation(lm, sets, eval_cfg, log)),
        lambda: json.loads((run_dir / "results_base.json").read_text()), log,
    )
    edited = load_model(str(run_dir / "checkpoint"), cfg.device, cfg.dtype, device_map=cfg.device_map)
    edited_results = evaluate_model(edited.model, edited.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer))
    timings["evaluate"] = time.perf_counter() - clock

    controls = {}
    for control in cfg.controls:
        clock = time.perf_counter()
        delta, info = build_control(cfg, run_dir, lm, built, control, log)
        model = copy.deepcopy(lm.model)
        apply_to_model(model, delta)
        controls[control] = {**info, "results": evaluate_model(model, lm.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer), progress=True)}
        timings[f"control_{control}"] = time.perf_counter() - clock

    # 7. report: results.json and the checkpoint's model card
    results = {
        "meta": provenance(cfg.seed, cfg.model, lm.weights_sha256, config=cfg.model_dump(), timings=timings),
        "edit": {k_: v for k_, v in manifest.items() if k_ != "shapes"},
        "k_selection": built.k_info,
        **({"search": built.search} if built.search else {}),
        "contrast": built.contrasts,
        "base": base_results,
        "edited": edited_results,
        "controls": controls,
    }
    atomic_write_json(run_dir / "results.json", results)
    write_model_card(run_dir / "checkpoint", manifest, _headline(results))
    return results


def _headline(results: dict) -> dict:
    """Before/after refusal per category of the first evaluated set."""
    name = next(iter(results["edited"]["sets"]))
    return {
        category: {"base": results["base"]["sets"][name][category]["refusal_rate"], "edited": cell["refusal_rate"], "n": cell["n"]}
        for category, cell in results["edited"]["sets"][name].items()
    }


def _slug(spec: str) -> str:
    """A file-name-safe form of a selection spec (``params:0.02`` → ``params-0.02``)."""
    return spec.replace(":", "-").replace("/", "_")


def _write_json(path: Path, obj):
    atomic_write_json(path, obj)
    return obj


def _save_delta(path: Path, delta: Delta, key: dict) -> Delta:
    save_sparse(delta, path, {"stage_key": fingerprint(key)})
    return delta
