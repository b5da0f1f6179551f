"""Optuna multi-objective search over the circuit size and the scale k of ΔθC, on the validation split.

A trial picks a circuit selection spec ``size`` (e.g. ``params:0.01``) and a scale ``k``, and
measures ``base + k·ΔθC(size)`` on validation prompts. Three objectives:

1. ``target_refusal`` (maximize): mean refusal rate over the target categories.
2. ``off_target_rise`` (minimize): the worst rise of refusal over the base model among the
   off-target cells (every other harmful category, harmless, look-alike), as a fraction;
   negative when every off-target cell fell.
3. ``kl`` (minimize): mean first-token KL(base ‖ edited) on the harmless validation prompts, nats.

Training is the expensive part, so ΔθC is trained at most once per size (and cached, sparse, in
memory); evaluating a trial only scales and applies it. The sampler is Optuna's multi-objective
TPE (MOTPE), seeded; the first trials are every size at k = ``START_K`` so each size is trained
and seen once before TPE proposes. The default pick (``choose``) is documented in ``RULE``.
"""

from __future__ import annotations

import copy
import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.edit.delta import Delta, apply_to_model, compose
from cdelta.errors import CdeltaError

Log = Callable[[str], None]

DEFAULT_SIZES = ("params:0.005", "params:0.01", "params:0.02", "params:0.04")
"""Circuit selection specs searched by default (fractions of all parameters)."""
DEFAULT_TRIALS = 12
"""Trials in total (not per size); on SmolLM2-135M one trial ≈ 40–60 s of validation generation."""
DEFAULT_K_RANGE = (0.5, 3.0)
"""Range of k searched; bounds must be multiples of ``K_STEP``."""
K_STEP = 0.05
"""k is searched on this grid, so trials are readable and repeated proposals are not re-evaluated."""
START_K = 1.0
"""k of the first trial of every size (clipped to the range)."""
OFF_TARGET_WEIGHT = 2.0
"""Weight of the worst off-target rise in the score (as in ``select_k.selection_score``)."""
STUDY_NAME = "cdelta-search"
OBJECTIVES = {"target_refusal": "maximize", "off_target_rise": "minimize", "kl": "minimize"}
RULE = (
    "Among the Pareto-optimal trials, the highest score = mean target refusal − 2 × max(0, worst off-target rise) "
    "(the k-selection rule of edit.select_k.selection_score); ties (within 1e-6) go to the lowest first-token KL, "
    "then to the earliest trial."
)


@dataclass(frozen=True)
class TrialMetrics:
    """What one candidate edit does on the validation prompts.

    ``rates``: refusal rate (fraction) per cell: each target category, each other harmful
    category, ``harmless`` and ``lookalike``. ``targets``: the keys of ``rates`` that are
    targets. ``kl``: mean first-token KL(base ‖ edited) on harmless prompts, nats (0 for the base).
    """

    rates: dict[str, float]
    targets: tuple[str, ...]
    kl: float

    @property
    def target_refusal(self) -> float:
        """Mean refusal rate over the target categories."""
        return sum(self.rates[t] for t in self.targets) / len(self.targets)

    def worst_rise(self, base: TrialMetrics) -> tuple[float, str | None]:
        """The largest ``rate − base rate`` over off-target cells, and its cell (0 and None if there are none)."""
        rises = {c: r - base.rates[c] for c, r in self.rates.items() if c not in self.targets}
        worst = max(rises, key=lambda c: (rises[c], c), default=None)
        return (rises[worst], worst) if worst is not None else (0.0, None)

    def to_json(self) -> dict:
        return {"rates": dict(self.rates), "targets": list(self.targets), "kl": self.kl}

    @classmethod
    def from_json(cls, data: dict) -> TrialMetrics:
        return cls(dict(data["rates"]), tuple(data["targets"]), float(data["kl"]))


@dataclass
class SearchResult:
    """Outcome of ``search_edit``; ``to_json()`` is what ``search.json`` / ``results["search"]`` hold.

    ``trials``: every completed trial as a JSON-serialisable dict (``number``, ``params`` {size, k},
    ``values`` {target_refusal, off_target_rise, kl}, ``rates``, ``worst`` cell, ``score``,
    ``pareto``, ``chosen``), ordered by trial number. ``chosen``: the trial picked by ``RULE``.
    """

    base: dict
    trials: list[dict]
    chosen: dict
    settings: dict
    rule: str = RULE
    objectives: dict = field(default_factory=lambda: dict(OBJECTIVES))

    @property
    def size(self) -> str:
        return self.chosen["params"]["size"]

    @property
    def k(self) -> float:
        return self.chosen["params"]["k"]

    @property
    def front(self) -> list[dict]:
        return [t for t in self.trials if t["pareto"]]

    def to_json(self) -> dict:
        return {"objectives": self.objectives, "rule": self.rule, "settings": self.settings, "base": self.base,
                "chosen": self.chosen["number"], "trials": self.trials}


def score(metrics: TrialMetrics, base: TrialMetrics) -> float:
    """``select_k.selection_score`` of a trial: mean target refusal − 2 · max(0, worst off-target rise)."""
    from cdelta.edit.select_k import selection_score

    return selection_score(metrics.rates, base.rates, list(metrics.targets))


def choose(trials: list[dict]) -> dict:
    """The trial ``RULE`` picks from trial dicts (as in ``SearchResult.trials``).

    A trial dominated by another never has a higher score (higher target and lower rise only
    raise it), so the pick also has the highest score of all trials; restricting to the front
    only settles ties, where the score ignores KL and rises below zero.
    """
    front = [t for t in trials if t["pareto"]]
    if not front:
        raise CdeltaError("the search has no completed trial", "run the search with search_trials ≥ 1")
    return min(front, key=lambda t: (-round(t["score"], 6), t["values"]["kl"], t["number"]))


def k_grid(k_range: Sequence[float]) -> tuple[float, float]:
    """Validated ``(low, high)`` bounds of k (non-negative, low < high, multiples of ``K_STEP``)."""
    if len(k_range) != 2:
        raise CdeltaError(f"k_range must be two numbers, got {list(k_range)}", "e.g. k_range = [0.5, 3.0]")
    low, high = (float(v) for v in k_range)
    if not 0 <= low < high or any(abs(v / K_STEP - round(v / K_STEP)) > 1e-6 for v in (low, high)):
        raise CdeltaError(f"bad k_range {list(k_range)}", f"use 0 ≤ low < high, both multiples of {K_STEP}, e.g. [0.5, 3.0]")
    return low, high


def _check_sizes(sizes: Sequence[str], n_trials: int) -> list[str]:
    from cdelta.circuits.circuit import parse_selection

    sizes = list(sizes)
    for spec in sizes:
        parse_selection(spec)
    if not sizes or len(set(sizes)) != len(sizes):
        raise CdeltaError(f"search sizes must be distinct and non-empty, got {sizes}", 'e.g. search_sizes = ["params:0.01", "params:0.02"]')
    if n_trials < len(sizes):
        raise CdeltaError(f"{n_trials} search trials cannot try each of {len(sizes)} sizes once", f"set search_trials ≥ {len(sizes)} or drop sizes")
    return sizes


class _DeltaCache:
    """ΔθC per size, trained on first use and kept as sparse COO tensors (dense on ``get``)."""

    def __init__(self, train_delta: Callable[[str], Delta], log: Log):
        self.train_delta, self.log, self.stored = train_delta, log, {}

    def get(self, size: str) -> Delta:
        if size not in self.stored:
            self.log(f"search: training ΔθC for circuit {size}")
            self.stored[size] = {name: value.to_sparse() for name, value in self.train_delta(size).items()}
        return {name: value.to_dense() for name, value in self.stored[size].items()}


def _sampler(seed: int, n_startup: int):
    """Seeded multi-objective TPE with ``n_startup`` random trials (the enqueued start points fill them)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup, multivariate=True)


def _open_study(storage: Path | None, settings: dict, seed: int, n_sizes: int):
    """A new in-memory study, or the SQLite study at ``storage`` (created, or resumed if its settings match)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = None
    if storage is not None:
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        url = f"sqlite:///{Path(storage).resolve()}"
    study = optuna.create_study(storage=url, study_name=STUDY_NAME, directions=list(OBJECTIVES.values()),
                                sampler=_sampler(seed, n_sizes), load_if_exists=True)
    stored = study.user_attrs.get("settings")
    if stored is None:
        study.set_user_attr("settings", settings)
    elif stored != json.loads(json.dumps(settings)):
        raise CdeltaError(f"{storage} holds a search with other settings ({stored})", f"delete {storage} or search with the same settings")
    return study


def _resume(study, seed: int, n_sizes: int, log: Log) -> None:
    """Re-queue trials left running by an interrupted process; reseed the sampler past the finished trials."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)
        study.enqueue_trial(trial.params)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if done:
        log(f"search: resuming after {done} completed trials")
        study.sampler = _sampler(seed + done, n_sizes)


def _start_points(study, sizes: list[str], low: float, high: float) -> None:
    """Enqueue every size at k = ``START_K`` (snapped into the range) on a fresh study."""
    if study.trials:
        return
    k = low + round((min(max(START_K, low), high) - low) / K_STEP) * K_STEP
    for size in sizes:
        study.enqueue_trial({"size": size, "k": k})


def _base_metrics(study, evaluate: Callable[[Delta, float], TrialMetrics], log: Log) -> TrialMetrics:
    """The base model's metrics (``evaluate({}, 0.0)``), stored in the study so a resume reuses them."""
    if "base" in study.user_attrs:
        return TrialMetrics.from_json(study.user_attrs["base"])
    log("search: evaluating the base model")
    base = evaluate({}, 0.0)
    study.set_user_attr("base", base.to_json())
    return base


def _previous(study, size: str, k: float) -> TrialMetrics | None:
    """Metrics of a completed trial with the same size and k (TPE can propose a point twice)."""
    from optuna.trial import TrialState

    for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if trial.params["size"] == size and math.isclose(trial.params["k"], k, abs_tol=1e-9):
            return TrialMetrics.from_json(trial.user_attrs["metrics"])
    return None


def _trial_dict(trial, base: TrialMetrics, front: set[int]) -> dict:
    metrics = TrialMetrics.from_json(trial.user_attrs["metrics"])
    rise, worst = metrics.worst_rise(base)
    return {
        "number": trial.number, "params": {"size": trial.params["size"], "k": round(trial.params["k"], 6)},
        "values": {"target_refusal": metrics.target_refusal, "off_target_rise": rise, "kl": metrics.kl},
        "rates": metrics.rates, "worst": worst, "score": score(metrics, base), "pareto": trial.number in front, "chosen": False,
    }


def search_edit(
    train_delta: Callable[[str], Delta],
    evaluate: Callable[[Delta, float], TrialMetrics],
    sizes: Sequence[str] = DEFAULT_SIZES,
    k_range: Sequence[float] = DEFAULT_K_RANGE,
    n_trials: int = DEFAULT_TRIALS,
    seed: int = 0,
    log: Log = print,
    storage: Path | None = None,
    context: dict | None = None,
) -> SearchResult:
    """Search circuit size × k for the three objectives of the module docstring; pick by ``RULE``.

    ``train_delta(size)`` returns the unscaled ΔθC for a circuit selection spec (called at most
    once per size); ``evaluate(delta, k)`` measures ``base + k·delta`` on validation prompts
    (``evaluate({}, 0.0)`` is the base model, measured once). ``n_trials`` counts all trials,
    the first being every size at k = ``START_K``. With ``storage`` (a SQLite file) the study is
    persistent: a rerun continues until ``n_trials`` trials are complete instead of restarting.
    ``context`` (e.g. the edit's stage key) is stored with the settings; a stored study made with
    other settings or context is refused. Deterministic for a given seed and deterministic callables.
    """
    sizes = _check_sizes(sizes, n_trials)
    low, high = k_grid(k_range)
    settings = {"sizes": sizes, "k_range": [low, high], "k_step": K_STEP, "seed": seed,
                "sampler": "TPESampler (multi-objective, multivariate)", "context": context or {}}
    study = _open_study(storage, settings, seed, len(sizes))
    _resume(study, seed, len(sizes), log)
    _start_points(study, sizes, low, high)
    base = _base_metrics(study, evaluate, log)
    deltas = _DeltaCache(train_delta, log)

    def objective(trial) -> tuple[float, float, float]:
        size = trial.suggest_categorical("size", sizes)
        k = trial.suggest_float("k", low, high, step=K_STEP)
        metrics = _previous(study, size, k) or evaluate(deltas.get(size), k)
        trial.set_user_attr("metrics", metrics.to_json())
        rise, worst = metrics.worst_rise(base)
        log(f"search trial {trial.number}: {size} k={k:g}: target {metrics.target_refusal:.0%}, "
            f"worst rise {rise:+.0%} ({worst}), KL {metrics.kl:.4f}")
        return metrics.target_refusal, rise, metrics.kl

    from optuna.trial import TrialState

    remaining = n_trials - len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if remaining > 0:
        study.optimize(objective, n_trials=remaining, n_jobs=1, gc_after_trial=False)
    front = {t.number for t in study.best_trials}
    trials = [_trial_dict(t, base, front) for t in study.get_trials(states=(TrialState.COMPLETE,))]
    chosen = choose(trials)
    chosen["chosen"] = True
    base_json = {"rates": base.rates, "target_refusal": base.target_refusal, "kl": base.kl}
    return SearchResult(base_json, trials, chosen, settings)


def validation_evaluator(
    model: torch.nn.Module, tokenizer, val, judge, targets: Sequence[str], batch_size: int
) -> Callable[[Delta, float], TrialMetrics]:
    """``evaluate(delta, k)`` for ``search_edit`` on a validation ``PromptSet`` (``select_k.validation_prompts``).

    Refusal per category from the short generations of ``select_k.quick_refusal`` (the k-rule's
    measurement); KL from first-reply-token log-probabilities on the harmless prompts against
    the unedited ``model``, which is never modified (each trial edits a deep copy).
    """
    from cdelta.data.prompts import HARMLESS
    from cdelta.evaluate import first_token_kl, next_token_logprobs
    from cdelta.edit.select_k import quick_refusal

    harmless = [p.text for p in val.filter(kind=HARMLESS)]
    if not harmless:
        raise CdeltaError("the validation prompts hold no harmless prompt for the KL objective", "include harmless prompts in the validation set")
    reference = next_token_logprobs(model, tokenizer, harmless, batch_size)

    def evaluate(delta: Delta, k: float) -> TrialMetrics:
        edited = model
        if delta and k:
            edited = copy.deepcopy(model)
            apply_to_model(edited, compose(delta, None, k))
        rates = quick_refusal(edited, tokenizer, val, judge, batch_size)
        kl = first_token_kl(reference, next_token_logprobs(edited, tokenizer, harmless, batch_size)) if edited is not model else 0.0
        return TrialMetrics(rates, tuple(targets), kl)

    return evaluate


def plot_pareto(search: dict, path: Path) -> Path:
    """PNG of a search (``SearchResult.to_json()``): target refusal vs worst off-target rise.

    Colour = circuit size; marker area grows with first-token KL; black rings mark the Pareto
    front over all three objectives (a ringed point can look dominated in this 2-D view when it
    wins on KL); the chosen trial is a large star; the base model is a grey cross at (0, base target).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.ticker import PercentFormatter

    trials = search.get("trials") or []
    sizes = list(dict.fromkeys([*(search.get("settings") or {}).get("sizes", []), *(str(t["params"].get("size", "?")) for t in trials)]))
    colors = {s: f"C{i % 10}" for i, s in enumerate(sizes)}
    max_kl = max([t["values"].get("kl") or 0.0 for t in trials] + [1e-12])
    fig = Figure(figsize=(6.8, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.axvline(0.0, color="#bbbbbb", lw=0.8, zorder=1)
    for t in trials:
        v = t["values"]
        xy, area = (v["off_target_rise"], v["target_refusal"]), 25 + 275 * (v.get("kl") or 0.0) / max_kl
        ax.scatter(*xy, s=area, color=colors[str(t["params"].get("size", "?"))], alpha=0.85,
                   edgecolors="black" if t.get("pareto") else "none", linewidths=1.4, zorder=2)
        ax.annotate(f"k={t['params']['k']:g}", xy, textcoords="offset points", xytext=(5, 4), fontsize=6.5)
    for t in trials:
        if t.get("chosen"):
            xy = (t["values"]["off_target_rise"], t["values"]["target_refusal"])
            ax.scatter(*xy, marker="*", s=330, color="#ffbf00", edgecolors="black", zorder=4)
            ax.annotate(f"chosen: {t['params'].get('size', '?')}, k={t['params']['k']:g}", xy, textcoords="offset points", xytext=(8, -12),
                        fontsize=7.5, fontweight="bold")
    base_target = (search.get("base") or {}).get("target_refusal")
    if base_target is not None:
        ax.scatter([0.0], [base_target], marker="X", s=80, color="#777777", zorder=3)
    handles = [Line2D([], [], marker="o", ls="", color=colors[s], label=s) for s in sizes]
    handles += [Line2D([], [], marker="o", ls="", mfc="white", mec="black", mew=1.4, label="Pareto front (3 objectives)"),
                Line2D([], [], marker="*", ls="", ms=13, mfc="#ffbf00", mec="black", label="chosen"),
                Line2D([], [], marker="X", ls="", ms=8, color="#777777", label="base model")]
    ax.legend(handles=handles, fontsize=7.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
              title=f"marker area ∝ KL\n(max {max_kl:.3g} nats)", title_fontsize=7.5)
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax.set_ylim(-0.05, 1.08)
    ax.set_xlabel("worst off-target refusal rise over base (lower is better)")
    ax.set_ylabel("target refusal (higher is better)")
    ax.set_title("search over circuit size × k (validation split)", fontsize=10)
    ax.grid(alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    return path
