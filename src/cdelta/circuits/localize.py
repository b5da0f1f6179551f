"""The localization pipeline behind ``cdelta localize``.

``localize`` pairs ``n_pairs`` train-split prompts of the target category (clean) with
contrast prompts (corrupted), scores every node (default EAP-IG, 5 steps, refusal
log-odds), selects a circuit, and — unless ``faithfulness=False`` — measures the
faithfulness curve against ``n_random`` random circuits and a shuffled-label control.
Everything is deterministic given ``seed`` (prompt sampling is by seeded hash, pair
order and shuffles by ``random.Random(seed)``).

Defaults and why: activations are patched only on the chat template's closing tokens
(``n_positions="suffix"``; identical tokens in clean and corrupted runs, ~6 positions),
which on SmolLM2-135M was both ~3x faster and more faithful than patching every aligned
position; the circuit is the best-ranked nodes (by ``|score|``) that fit into 5% of the
parameters (``selection="params:0.05"``). A warning is recorded (``warnings`` and
``circuit.json``) when the metric gap between the two prompt pools is within two
standard errors of zero: then there is nothing to localize and scores are noise.

``metric="category"`` (for bases that refuse nothing) is fitted here, before attribution,
by ``fit_category_metric`` on the ``split`` prompts of the target category vs the same
contrast pool, *leaving out the prompts of the attribution pairs*: the pairs' metric gap
(``metric_gap`` in ``circuit.json``) is then a held-out check of the fitted direction,
while its in-sample separation is recorded as ``metric.fit_gap``.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from cdelta import __version__
from cdelta.circuits import attribution as attr_mod
from cdelta.circuits import edge_attribution as edge_attr_mod
from cdelta.circuits import edges as edges_mod
from cdelta.circuits import faithfulness as faith_mod
from cdelta.circuits.attribution import AttributionResult, attribute
from cdelta.circuits.circuit import Circuit
from cdelta.circuits.edge_attribution import EdgeAttribution
from cdelta.circuits.graph import EdgeGraph
from cdelta.circuits.metric import CategoryMetric, Metric, fit_category_metric, get_metric
from cdelta.circuits.plots import plot_faithfulness, plot_heatmap
from cdelta.data.prompts import LOOKALIKE, Prompt, PromptSet
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_json
from cdelta.ui import progress_bar
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import LoadedModel

if TYPE_CHECKING:
    from cdelta.config import RunConfig

CONTRASTS = ("harmful", "harmless")
"""Named contrast pools; any other category present in the prompts also works."""

DEFAULT_SELECTION = "params:0.05"
"""Default circuit: the best-ranked nodes that fit into 5% of the model's parameters."""


@dataclass
class LocalizeResult:
    """What ``localize`` produced.

    ``circuit``: all node scores plus the selected nodes (``selection``), with provenance.
    ``faithfulness``: the curve dict of ``faithfulness_curve`` (None if skipped).
    ``pairs``: (clean prompt id, corrupted prompt id). ``files``: written paths by kind.
    """

    circuit: Circuit
    attribution: AttributionResult | EdgeAttribution
    faithfulness: dict | None
    shuffled: AttributionResult | EdgeAttribution | None
    pairs: list[tuple[str, str]]
    n_params: int
    param_fraction: float
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def target_categories(prompts: PromptSet) -> list[str]:
    """Categories a circuit can be localized for: those of the harmful prompts in ``prompts``
    (first-seen order), and ``lookalike`` when there are look-alikes (over-refusal repair)."""
    return prompts.filter(kind="harmful").categories() + ([LOOKALIKE] if len(prompts.filter(category=LOOKALIKE)) else [])


def prompt_pools(prompts: PromptSet, category: str, contrast: str = "harmful", split: str = "train") -> tuple[PromptSet, PromptSet]:
    """``(target, contrast pool)`` of ``split``: the ``category`` prompts, and the harmful
    prompts of other categories (``harmful``), harmless prompts (``harmless``) or one named category."""
    cats = target_categories(prompts)
    if category not in cats:
        raise CdeltaError(f"unknown category '{category}'", f"use one of: {', '.join(cats) or '(no harmful prompts loaded)'}")
    if contrast == "harmful":
        pool = prompts.filter(kind="harmful", split=split, exclude_category=category)
    elif contrast == category:
        raise CdeltaError("contrast must differ from the target category", "use --contrast harmful or harmless")
    elif contrast in prompts.categories():
        pool = prompts.filter(category=contrast, split=split)
    else:
        options = ", ".join([*CONTRASTS, *[c for c in prompts.categories() if c not in CONTRASTS and c != category]])
        raise CdeltaError(f"unknown contrast '{contrast}'", f"use one of: {options}")
    return prompts.filter(category=category, split=split), pool


MIN_PAIRS = 2
"""Fewest clean/corrupted pairs attribution works with (and that the default split leaves to fit on)."""


def check_n_pairs(n_pairs) -> None:
    """CdeltaError unless ``n_pairs`` is a whole number of at least ``MIN_PAIRS``."""
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, int) or n_pairs < MIN_PAIRS:
        raise CdeltaError(f"--n-pairs {n_pairs} is too few: localization needs at least {MIN_PAIRS} clean/corrupted prompt pairs",
                          f"use --n-pairs {MIN_PAIRS} or more (default 32)")


def make_pairs(
    prompts: PromptSet, category: str, contrast: str = "harmful", n_pairs: int = 32, seed: int = 0, split: str = "train"
) -> tuple[list[Prompt], list[Prompt], list[str]]:
    """``(clean, corrupted, warnings)``: ``n`` paired prompts of ``split``.

    clean = ``category``; corrupted = the contrast pool (``prompt_pools``). Both are
    sampled with ``PromptSet.sample`` (seeded hash) and put in a seeded random order, so
    the pairing is deterministic and the contrast categories are mixed.
    """
    check_n_pairs(n_pairs)
    target, pool = prompt_pools(prompts, category, contrast, split)
    n = min(n_pairs, len(target), len(pool))
    warnings = []
    if n < 2:
        raise CdeltaError(
            f"only {len(target)} '{category}' and {len(pool)} '{contrast}' prompts in the {split} split",
            "add prompts or use another split",
        )
    if n < n_pairs:
        warnings.append(f"only {n} pairs available in the {split} split (asked for {n_pairs})")
    rng = random.Random(seed)
    clean = list(target.sample(n, seed))
    corrupt = list(pool.sample(n, seed))
    rng.shuffle(clean)
    rng.shuffle(corrupt)
    return clean, corrupt, warnings


def fit_category_for(
    lm: LoadedModel, prompts: PromptSet, category: str, contrast: str, split: str, held_out: set[str], batch_size: int = 8,
    task: Callable[[str, int], Callable[[], None] | None] | None = None,
) -> CategoryMetric:
    """The ``category`` metric fitted on the ``split`` prompts of ``category`` vs the contrast
    pool, without the prompts whose ids are in ``held_out`` (the attribution pairs).

    Its ``provenance`` also names the category, contrast, split and how many prompts were
    held out. ``task(description, n_batches)`` may return a per-batch progress callback.
    """
    target, pool = prompt_pools(prompts, category, contrast, split)
    target_texts = [p.text for p in target if p.id not in held_out]
    contrast_texts = [p.text for p in pool if p.id not in held_out]
    if len(target_texts) < 2 or len(contrast_texts) < 2:
        raise CdeltaError(
            f"the category metric is fitted on the {split}-split prompts not used as attribution pairs: "
            f"only {len(target_texts)} '{category}' and {len(contrast_texts)} '{contrast}' prompts are left",
            f"use at most {min(len(target), len(pool)) - 2} pairs, or add {split}-split prompts",
        )
    n_batches = sum(-(-len(texts) // batch_size) for texts in (target_texts, contrast_texts))
    on_batch = task("fit category metric", n_batches) if task else None
    fitted = fit_category_metric(lm.model, lm.tokenizer, target_texts, contrast_texts, batch_size, on_batch)
    fitted.provenance = {"fit_category": category, "fit_contrast": contrast, "fit_split": split,
                         "fit_held_out_prompts": len(held_out), **fitted.provenance}
    return fitted


def shuffled_pairs(clean: list[str], corrupt: list[str], seed: int) -> tuple[list[str], list[str]]:
    """Null control: pool both sides, shuffle (seeded), split back into two equal halves."""
    pool = list(clean) + list(corrupt)
    random.Random(f"shuffle:{seed}").shuffle(pool)
    return pool[: len(clean)], pool[len(clean) :]


class _Bars:
    """Progress bars (rich, on stderr) or no-ops."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.progress = None

    @contextmanager
    def running(self):
        with progress_bar(self.enabled) as progress:
            self.progress = progress if self.enabled else None
            yield self
        self.progress = None

    def task(self, description: str, total: int):
        if self.progress is None:
            return None
        task_id = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task_id)


@dataclass(frozen=True)
class _Strategy:
    """What localization scores and keeps: nodes or edges.

    ``attribute``/``count_passes``: the scorer and its progress ticks (``max_memory``: it
    takes ``max_memory_mb``); ``curve`` (``patch_only``: patch ablation only) and
    ``n_units`` (of an architecture): the faithfulness curve and what its fractions count;
    ``circuit(result, selection, model, by, meta)``: the selected circuit; ``heat(result)``:
    the ``[n_layers, n_heads + 1]`` node matrix of the heat map.
    """

    name: str
    methods: tuple[str, ...]
    fractions: tuple[float, ...]
    attribute: Callable
    max_memory: bool
    count_passes: Callable
    curve: Callable
    patch_only: bool
    n_units: Callable
    circuit: Callable
    heat: Callable


_NODES = _Strategy(
    name="node",
    methods=attr_mod.METHODS,
    fractions=faith_mod.DEFAULT_FRACTIONS,
    attribute=attribute,
    max_memory=True,
    count_passes=attr_mod.count_passes,
    curve=faith_mod.faithfulness_curve,
    patch_only=False,
    n_units=lambda arch: arch.n_layers * (arch.n_heads + 1),
    circuit=lambda result, selection, model, by, meta: Circuit.from_scores(result.arch, result.node_scores(), **meta).select_spec(
        selection, model=model, by=by),
    heat=lambda result: result.scores,
)

_EDGES = _Strategy(
    name="edge",
    methods=edge_attr_mod.EDGE_METHODS,
    fractions=edges_mod.EDGE_FRACTIONS,
    attribute=edge_attr_mod.attribute_edges,
    max_memory=False,
    count_passes=edge_attr_mod.count_passes,
    curve=edges_mod.edge_faithfulness_curve,
    patch_only=True,
    n_units=lambda arch: EdgeGraph.of(arch).n_edges,
    circuit=lambda result, selection, model, by, meta: edges_mod.edge_circuit(result, selection, model, by=by, **meta),
    heat=lambda result: result.node_matrix(),
)


def localize(
    lm: LoadedModel,
    category: str,
    prompts: PromptSet,
    contrast: str = "harmful",
    n_pairs: int = 32,
    method: str = "eap-ig",
    steps: int = 5,
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    seed: int = 0,
    out_dir: Path | None = None,
    progress: bool = True,
    faithfulness: bool = True,
    *,
    selection: str | dict = DEFAULT_SELECTION,
    n_positions: int | str | None = "suffix",
    n_random: int = 5,
    fractions: tuple[float, ...] | None = None,
    ablation: str = "patch",
    by: str = "abs",
    split: str = "train",
    edges: bool = False,
    max_memory_mb: float | None = None,
) -> LocalizeResult:
    """Find the circuit carrying ``lm``'s refusal of ``category`` (see module docstring).

    Writes ``circuit.json``, ``heatmap.png`` and (with faithfulness) ``faithfulness.json``
    and ``faithfulness.png`` into ``out_dir`` when given. ``selection``: ``top_k:N``,
    ``top_frac:F``, ``threshold:S`` or ``params:F`` (fraction of model parameters).
    ``edges=True``: score writer → reader edges instead (``cdelta.circuits.edges``); the
    selection then counts edges, the faithfulness curve keeps edges (``fractions`` of all
    edges, default ``EDGE_FRACTIONS``; node default ``DEFAULT_FRACTIONS``), and the heat map
    shows each node's summed out-edge scores. ``max_memory_mb`` bounds node attribution's
    working memory (``attribution.plan_batches``). ``metric``: a name (``logodds``,
    ``teacher-forced``, or ``category``: fitted here, see the module docstring) or a
    ``Metric`` instance; ``circuit.json`` records its ``describe()`` under ``metric``.
    Raises ``CdeltaError`` for an unknown category, contrast, method or metric.
    """
    check_n_pairs(n_pairs)
    strategy = _EDGES if edges else _NODES
    if method not in strategy.methods:
        raise CdeltaError(f"unknown {'edge ' * edges}attribution method '{method}'", f"use one of: {', '.join(strategy.methods)}")
    if strategy.patch_only and faithfulness and ablation != "patch":
        raise CdeltaError(f"{strategy.name} faithfulness supports only patch ablation, not '{ablation}'", "use ablation='patch'")
    if fractions is None:
        fractions = strategy.fractions
    if not strategy.max_memory and max_memory_mb is not None:
        raise CdeltaError("--max-memory-mb bounds node attribution only", "drop --max-memory-mb when using --edges")
    run_attribution = strategy.attribute
    bound = {"max_memory_mb": max_memory_mb} if strategy.max_memory else {}
    count_passes = strategy.count_passes
    fit_category = metric == "category"
    if not fit_category:
        metric = get_metric(metric, lm.tokenizer)  # validate early
    model, tok = lm.model, lm.tokenizer
    arch = architecture_of(model)
    clean_p, corrupt_p, warnings = make_pairs(prompts, category, contrast, n_pairs, seed, split)
    clean, corrupt = [p.text for p in clean_p], [p.text for p in corrupt_p]
    n = len(clean)
    seconds: dict[str, float] = {}
    bars = _Bars(progress)
    start = time.perf_counter()
    shuffled = None
    curve = None
    with bars.running():
        if fit_category:
            t = time.perf_counter()
            held_out = {p.id for p in clean_p + corrupt_p}
            metric = fit_category_for(lm, prompts, category, contrast, split, held_out, batch_size, bars.task)
            seconds["metric_fit"] = time.perf_counter() - t
        t = time.perf_counter()
        result = run_attribution(
            model, tok, clean, corrupt, method=method, steps=steps, metric=metric, batch_size=batch_size,
            n_positions=n_positions, on_pass=bars.task(f"{method} attribution", count_passes(method, arch, n, batch_size, steps)), **bound,
        )
        seconds["attribution"] = time.perf_counter() - t
        if faithfulness:
            t = time.perf_counter()
            s_clean, s_corrupt = shuffled_pairs(clean, corrupt, seed)
            shuffled = run_attribution(
                model, tok, s_clean, s_corrupt, method=method, steps=steps, metric=metric, batch_size=batch_size,
                n_positions=n_positions, on_pass=bars.task("shuffled-label control", count_passes(method, arch, n, batch_size, steps)), **bound,
            )
            seconds["shuffled_attribution"] = time.perf_counter() - t
            t = time.perf_counter()
            sizes = faith_mod.circuit_sizes(strategy.n_units(arch), fractions)
            curve = strategy.curve(
                model, tok, clean, corrupt, result.scores, shuffled_scores=shuffled.scores, fractions=fractions,
                n_random=n_random, seed=seed, by=by, ablation=ablation, metric=metric, batch_size=batch_size,
                n_positions=n_positions,
                on_pass=bars.task("faithfulness", faith_mod.count_passes(n, batch_size, len(set(sizes)), n_random, True, ablation)),
            )
            seconds["faithfulness"] = time.perf_counter() - t
    per_pair_gap = result.m_clean - result.m_corrupt
    gap, gap_se = float(per_pair_gap.mean()), float(per_pair_gap.std() / n**0.5)
    if not abs(gap) > 2 * gap_se:
        warnings.append(
            f"the {metric.name} metric barely differs between '{category}' and '{contrast}' prompts "
            f"(gap {gap:.3f} ± {gap_se:.3f} SE over {n} pairs): the scores and faithfulness ratios are dominated by noise"
        )
    meta = dict(
        model=lm.name,
        weights_sha256=lm.weights_sha256,
        category=category,
        contrast=contrast,
        split=split,
        method=method,
        steps=result.steps,
        metric=result.metric,
        seed=seed,
        n_pairs=n,
        n_positions=n_positions,
        batch_size=batch_size,
        pairs=[[c.id, k.id] for c, k in zip(clean_p, corrupt_p)],
        m_clean=float(result.m_clean.mean()),
        m_corrupt=float(result.m_corrupt.mean()),
        metric_gap=gap,
        metric_gap_se=gap_se,
        cdelta_version=__version__,
    )
    circuit = strategy.circuit(result, selection, model, by, meta)
    if curve is not None:
        circuit.meta["faithfulness_summary"] = {
            "fractions": curve["fractions"], "circuit": curve["circuit"]["recovered"],
            "random_mean": curve["random"]["mean"], "random_sd": curve["random"]["sd"],
            "shuffled": curve["shuffled"]["recovered"] if curve["shuffled"] else None,
        }
    seconds["total"] = time.perf_counter() - start
    circuit.meta["warnings"] = list(warnings)
    circuit.meta["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    files: dict[str, Path] = {}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        files["circuit"] = circuit.to_json(out_dir / "circuit.json")
        files["heatmap"] = plot_heatmap(
            strategy.heat(result), out_dir / "heatmap.png", selected=circuit.mask_matrix(),
            title=f"{lm.name}: {category} vs {contrast} ({method}{' edges' * edges}, {result.steps} steps, {n} pairs)",
        )
        if curve is not None:
            faith_json = dict(curve, category=category, contrast=contrast, method=method, steps=result.steps, seed=seed, model=lm.name,
                              weights_sha256=lm.weights_sha256, cdelta_version=__version__)
            files["faithfulness"] = out_dir / "faithfulness.json"
            atomic_write_json(files["faithfulness"], faith_json)
            files["faithfulness_plot"] = plot_faithfulness(curve, out_dir / "faithfulness.png", title=f"{lm.name}: {category} vs {contrast}")
    return LocalizeResult(
        circuit=circuit,
        attribution=result,
        faithfulness=curve,
        shuffled=shuffled,
        pairs=[(c.id, k.id) for c, k in zip(clean_p, corrupt_p)],
        n_params=int(circuit.meta["n_params"]),
        param_fraction=float(circuit.meta["param_fraction"]),
        seconds=seconds,
        files=files,
        warnings=warnings,
    )


@torch.no_grad()
def refusal_gap(lm: LoadedModel, prompts: PromptSet, category: str, contrast: str, n_pairs: int = 32, seed: int = 0,
                metric: str | Metric = "logodds", batch_size: int = 8) -> tuple[float, float]:
    """Mean and standard error of metric(clean) − metric(corrupted) over the localize pairs (forward passes only)."""
    clean, corrupt, _ = make_pairs(prompts, category, contrast, n_pairs, seed)
    scorer = get_metric(metric, lm.tokenizer)
    values = []
    for group in (clean, corrupt):
        rows = []
        for start in range(0, len(group), batch_size):
            encoded = scorer.encode(lm.tokenizer, [p.text for p in group[start : start + batch_size]]).to(lm.device)
            rows.append(scorer(lm.model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask).logits, encoded).cpu())
        values.append(torch.cat(rows))
    gap = values[0] - values[1]
    return float(gap.mean()), float(gap.std() / len(gap) ** 0.5)


def fixed_contrast_rule(category: str, metric: str) -> str | None:
    """Why ``contrast = "auto"`` means ``harmful`` (the other categories' harmful prompts) without measuring a refusal gap, or None."""
    if category == LOOKALIKE:
        return "look-alike target: corrupted prompts are the harmful ones"
    if metric == "category":
        return "category metric: evidence for the category against the other harm categories"
    return None


def choose_contrast(lm: LoadedModel, prompts: PromptSet, category: str, n_pairs: int = 32, seed: int = 0) -> tuple[str, dict]:
    """``auto`` contrast: other harmful categories when the model's refusal already separates
    them from the target (|gap| > 2 SE), else harmless prompts (a model that refuses nothing)."""
    gap, se = refusal_gap(lm, prompts, category, "harmful", n_pairs, seed)
    chosen = "harmful" if abs(gap) > 2 * se else "harmless"
    return chosen, {"harmful_gap": gap, "harmful_gap_se": se, "chosen": chosen}


def localize_targets(cfg: RunConfig, run_dir: Path, lm: LoadedModel, prompts: PromptSet, base_key: dict,
                     log: Callable[[str], None]) -> tuple[list[Circuit], dict]:
    """A run's localization: one circuit per target category of ``cfg`` (resumable stages
    ``contrast-CATEGORY`` and ``localize-CATEGORY`` in ``run_dir/localize/CATEGORY``).

    ``contrast = "auto"`` is resolved per category: ``harmful`` by ``fixed_contrast_rule``,
    else by ``choose_contrast``. Returns ``(circuits, contrasts)``: the circuits in category
    order and, per category resolved automatically, how its contrast was chosen.
    """
    from cdelta.stages import prompts_digest, run_stage

    circuits, contrasts = [], {}
    for category in cfg.category:
        sub = run_dir / "localize" / category
        category_key = {**base_key, "category": category, "prompts": prompts_digest(prompts)}
        contrast = cfg.contrast
        fixed_rule = fixed_contrast_rule(category, cfg.localize_metric)
        if contrast == "auto" and fixed_rule:
            contrast = "harmful"
            contrasts[category] = {"chosen": contrast, "rule": fixed_rule}
            log(f"{category}: contrast {contrast} ({fixed_rule})")
        elif contrast == "auto":
            path = sub / "contrast.json"
            sub.mkdir(parents=True, exist_ok=True)
            contrasts[category] = run_stage(
                run_dir, f"contrast-{category}", {**category_key, "n_pairs": cfg.n_pairs}, [f"localize/{category}/contrast.json"],
                lambda: _written(path, choose_contrast(lm, prompts, category, cfg.n_pairs, cfg.seed)[1]),
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
    return circuits, contrasts


def _written(path: Path, obj):
    atomic_write_json(path, obj)
    return obj
