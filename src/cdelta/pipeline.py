"""The main job, ``cdelta run``: localize → edit → choose k → export → evaluate.

Every stage writes its artifact into the run directory and is skipped on a rerun
whose inputs are unchanged (see ``stages.run_stage``).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cdelta.config import RunConfig
from cdelta.data.builtin import load_builtin
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.edit.data import own_reply_pairs, refusal_pairs, retain_prompts
from cdelta.edit.delta import Delta, apply_to_model, compose, load_sparse, save_sparse
from cdelta.edit.export import export_edit, write_model_card
from cdelta.edit.train import EditData, masked_finetune
from cdelta.evaluate import EvalConfig, evaluate_model, judge_generations, limit_per_category, refusal_stats
from cdelta.io import atomic_write_json, provenance
from cdelta.models.loading import LoadedModel, load_model
from cdelta.stages import file_digest, fingerprint, run_stage

Log = Callable[[str], None]
K_SELECT_TOKENS = 12
"""Tokens generated per validation prompt when choosing k (the judge reads the opening)."""


def _quick_refusal(model, tokenizer, prompts: PromptSet, judge, batch_size: int) -> dict[str, float]:
    """Refusal rate per group (target/other/harmless/lookalike keys chosen by caller) on short generations."""
    _, refused = judge_generations(model, tokenizer, prompts, judge, K_SELECT_TOKENS, batch_size, progress=False)
    return {cat: cell.rate for cat, cell in refusal_stats(prompts, refused).items()}


def selection_score(rates: dict[str, float], base: dict[str, float], targets: list[str]) -> float:
    """The k-selection rule: mean target refusal minus twice the worst off-target rise.

    Off-target cells are every non-target category (other harmful, harmless, look-alike);
    a rise is measured against the base model on the same validation prompts.
    """
    target = sum(rates[t] for t in targets) / len(targets)
    rises = [rates[c] - base[c] for c in rates if c not in targets]
    return target - 2 * max([0.0, *rises])


def choose_k(lm: LoadedModel, delta: Delta, val: PromptSet, grid: list[float], cfg: RunConfig, judge, log: Log) -> dict:
    """Evaluate base and base + k·ΔθC on validation prompts for each k; pick by ``selection_score``."""
    base = _quick_refusal(lm.model, lm.tokenizer, val, judge, cfg.eval_batch_size)
    trials = []
    for k in grid:
        edited = copy.deepcopy(lm.model)
        apply_to_model(edited, compose(delta, None, k))
        rates = _quick_refusal(edited, lm.tokenizer, val, judge, cfg.eval_batch_size)
        score = selection_score(rates, base, cfg.category)
        trials.append({"k": k, "rates": rates, "score": score})
        log(f"k={k:g}: score {score:.3f} " + ", ".join(f"{c} {r:.0%}" for c, r in rates.items()))
        del edited
    best = max(trials, key=lambda t: (round(t["score"], 6), -t["k"]))
    return {"k": best["k"], "base_rates": base, "trials": trials, "rule": selection_score.__doc__.split("\n")[0]}


def validation_prompts(prompts: PromptSet, targets: list[str], seed: int) -> PromptSet:
    """Validation prompts for choosing k: all target prompts, and capped samples of the rest."""
    val = prompts.filter(split="val")
    chosen = val.filter(category=targets).prompts
    chosen += limit_per_category(val.filter(kind="harmful", exclude_category=targets), 8, seed).prompts
    chosen += val.filter(kind=HARMLESS).sample(40, seed).prompts + val.filter(kind=LOOKALIKE).sample(32, seed).prompts
    return PromptSet("val", chosen)


def random_circuit_like(circuit, seed: int):
    """A circuit with as many heads and MLPs as ``circuit``, drawn uniformly at random."""
    rng = random.Random(seed)
    nodes = list(circuit.scores)
    heads = [n for n in nodes if not n.endswith("MLP")]
    mlps = [n for n in nodes if n.endswith("MLP")]
    chosen = rng.sample(heads, len(circuit.heads())) + rng.sample(mlps, len(circuit.mlps()))
    return circuit.with_nodes(chosen, {"kind": "random", "seed": seed, "like": circuit.meta.get("selection")})


def _train_delta(lm: LoadedModel, masks, data: EditData, cfg: RunConfig, contrast_data: EditData | None, label: str) -> Delta:
    """Direct: one masked fine-tune. Contrastive: θ_pos − θ_neg from two masked fine-tunes."""
    train = cfg.train_config()
    positive = masked_finetune(lm.model, lm.tokenizer, masks, data, train, description=f"{label}: θ_pos")
    if cfg.variant == "direct":
        return positive
    negative = masked_finetune(lm.model, lm.tokenizer, masks, contrast_data, train, description=f"{label}: θ_neg")
    return compose(positive, negative, 1.0)


def run_pipeline(cfg: RunConfig, run_dir: Path, log: Log = print) -> dict:
    """Run (or resume) the whole job; returns the results written to ``results.json``."""
    from cdelta.circuits.circuit import Circuit
    from cdelta.circuits.localize import choose_contrast, localize
    from cdelta.judge import get_judge

    run_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    judge = get_judge(cfg.judge)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code)
    prompts = load_builtin()
    base_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed}
    timings["load"] = time.perf_counter() - clock

    # 1. localize: one circuit per target category, united
    clock = time.perf_counter()
    circuits, contrasts = [], {}
    for category in cfg.category:
        sub = run_dir / "localize" / category
        contrast = cfg.contrast
        if contrast == "auto":
            contrast, contrasts[category] = choose_contrast(lm, prompts, category, cfg.n_pairs, cfg.seed)
            log(f"{category}: contrast {contrast} (refusal gap to other harmful categories "
                f"{contrasts[category]['harmful_gap']:.3f} ± {contrasts[category]['harmful_gap_se']:.3f} SE)")
        key = {**base_key, "category": category, "contrast": contrast, **cfg.model_dump(include={"n_pairs", "method", "ig_steps", "circuit", "faithfulness"})}
        circuits.append(
            run_stage(
                run_dir, f"localize-{category}", key, [f"localize/{category}/circuit.json"],
                lambda: localize(lm, category, prompts, contrast=contrast, n_pairs=cfg.n_pairs, method=cfg.method,
                                 steps=cfg.ig_steps, seed=cfg.seed, out_dir=sub, selection=cfg.circuit,
                                 faithfulness=cfg.faithfulness).circuit,
                lambda: Circuit.from_json(sub / "circuit.json"), log,
            )
        )
    timings["localize"] = time.perf_counter() - clock
    selected = [c.select_spec(cfg.circuit, lm.model) for c in circuits]
    masks = _union_masks([c.param_masks(lm.model) for c in selected])

    # 2. retain data: the base model's own replies
    clock = time.perf_counter()
    retain_set = retain_prompts(prompts, cfg.category, cfg.retain_counts(), cfg.seed)
    retain_key = {**base_key, "ids": [p.id for p in retain_set]}
    retain = run_stage(
        run_dir, "retain", retain_key, ["retain.json"],
        lambda: _write_json(run_dir / "retain.json", own_reply_pairs(lm.model, lm.tokenizer, retain_set, 16)),
        lambda: [tuple(x) for x in json.loads((run_dir / "retain.json").read_text())], log,
    )
    timings["retain"] = time.perf_counter() - clock

    # 3. edit: circuit-restricted ΔθC (before scaling by k)
    clock = time.perf_counter()
    target = prompts.filter(split="train", category=cfg.category)
    data = EditData(sum((refusal_pairs(target.filter(category=c), c, cfg.seed) for c in cfg.category), []), retain)
    contrast = None
    if cfg.variant == "contrastive":
        own = run_stage(run_dir, "own-target", {**base_key, "ids": [p.id for p in target]}, ["own_target.json"],
                        lambda: _write_json(run_dir / "own_target.json", own_reply_pairs(lm.model, lm.tokenizer, target, 24)),
                        lambda: [tuple(x) for x in json.loads((run_dir / "own_target.json").read_text())], log)
        contrast = EditData(own, retain)
    edit_fields = {"variant", "steps", "lr", "batch_size", "retain_weight", "first_token_weight", "circuit", "category"}
    edit_key = {**base_key, "circuits": [file_digest(run_dir / "localize" / c / "circuit.json") for c in cfg.category],
                "retain": file_digest(run_dir / "retain.json"), **cfg.model_dump(include=edit_fields)}
    raw = run_stage(
        run_dir, "edit", edit_key, ["delta_unscaled.safetensors"],
        lambda: _save_delta(run_dir / "delta_unscaled.safetensors", _train_delta(lm, masks, data, cfg, contrast, "circuit"), edit_key),
        lambda: load_sparse(run_dir / "delta_unscaled.safetensors")[0], log,
    )
    timings["edit"] = time.perf_counter() - clock

    # 4. k on the validation split
    clock = time.perf_counter()
    val = validation_prompts(prompts, cfg.category, cfg.seed)
    k_key = {**edit_key, "k": cfg.k, "k_grid": cfg.k_grid, "judge": cfg.judge}
    k_info = run_stage(
        run_dir, "choose-k", k_key, ["k_selection.json"],
        lambda: _write_json(run_dir / "k_selection.json", {"k": cfg.k, "rule": "given"} if cfg.k is not None else choose_k(lm, raw, val, cfg.k_grid, cfg, judge, log)),
        lambda: json.loads((run_dir / "k_selection.json").read_text()), log,
    )
    k = k_info["k"]
    delta = compose(raw, None, k)
    timings["choose_k"] = time.perf_counter() - clock

    # 5. export
    clock = time.perf_counter()
    manifest = {
        "category": ",".join(cfg.category), "direction": cfg.direction, "k": k, "seed": cfg.seed, "variant": cfg.variant,
        "circuit": {"selection": cfg.circuit, "nodes": sorted(set(n for c in selected for n in c.nodes)), "method": cfg.method},
    }
    manifest = export_edit(lm, delta, run_dir, manifest)
    timings["export"] = time.perf_counter() - clock

    # 6. evaluate base and the exported checkpoint (loaded fresh, as users will)
    clock = time.perf_counter()
    eval_cfg = EvalConfig("test", cfg.judge, cfg.max_new_tokens, cfg.eval_batch_size, cfg.eval_limit, cfg.mmlu_n, seed=cfg.seed)
    sets = [_eval_source(name) for name in cfg.eval_prompts]
    eval_key = {**base_key, "eval": vars(eval_cfg), "sets": cfg.eval_prompts}
    base_results = run_stage(
        run_dir, "eval-base", eval_key, ["results_base.json"],
        lambda: _write_json(run_dir / "results_base.json", evaluate_model(lm.model, lm.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer))),
        lambda: json.loads((run_dir / "results_base.json").read_text()), log,
    )
    edited = load_model(str(run_dir / "checkpoint"), cfg.device, cfg.dtype)
    edited_results = evaluate_model(edited.model, edited.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer))
    timings["evaluate"] = time.perf_counter() - clock

    # 7. controls at equal size: random circuit, and unrestricted fine-tune
    controls = {}
    for control in cfg.controls:
        clock = time.perf_counter()
        randoms = [random_circuit_like(c, cfg.seed + 1) for c in selected] if control == "random" else []
        control_masks = _union_masks([c.param_masks(lm.model) for c in randoms]) if randoms else _all_masks(lm.model)
        control_delta = compose(_train_delta(lm, control_masks, data, cfg, contrast, control), None, k)
        model = copy.deepcopy(lm.model)
        apply_to_model(model, control_delta)
        controls[control] = {
            "params_touched": int(sum(int(m.sum()) for m in control_masks.values())),
            "nodes": sorted(n for c in randoms for n in c.nodes) if randoms else "all parameters",
            "results": evaluate_model(model, lm.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer), progress=True),
        }
        timings[f"control_{control}"] = time.perf_counter() - clock

    results = {
        "meta": provenance(cfg.seed, cfg.model, lm.weights_sha256, config=cfg.model_dump(), timings=timings),
        "edit": {k_: v for k_, v in manifest.items() if k_ != "shapes"},
        "k_selection": k_info,
        "contrast": contrasts,
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


def _eval_source(name: str) -> PromptSet:
    from cdelta.data.registry import load_source

    return load_source(name)


def _union_masks(mask_sets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Element-wise OR of several circuits' masks."""
    union: dict[str, torch.Tensor] = {}
    for masks in mask_sets:
        for name, mask in masks.items():
            union[name] = union[name] | mask if name in union else mask.clone()
    return union


def _all_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Masks selecting every parameter (the unrestricted fine-tune control)."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def _write_json(path: Path, obj):
    atomic_write_json(path, obj)
    return obj


def _save_delta(path: Path, delta: Delta, key: dict) -> Delta:
    save_sparse(delta, path, {"stage_key": fingerprint(key)})
    return delta
