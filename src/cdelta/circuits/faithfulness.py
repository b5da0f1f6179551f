"""Faithfulness of circuits of increasing size, against random and shuffled-label controls.

One skeleton (``curve``) serves node circuits (``faithfulness_curve``, below) and edge
circuits (``cdelta.circuits.edges.edge_faithfulness_curve``); a ``Units`` says what is
kept, ranked, drawn at random and evaluated. For nodes:

For a node set ``C`` we run the clean prompts with every node *outside* ``C`` replaced
inside the aligned window (see ``cdelta.circuits.attribution``) by its corrupted
activation (``ablation="patch"``, default) or by its mean corrupted activation
(``ablation="mean"``: mean over all corrupted examples and window positions); nodes in
``C`` are computed normally. Then::

    recovered(C) = (m(C) - m(∅)) / (m(clean) - m(∅))

with means over examples, where ``m(∅)`` patches every node (for ``patch`` this is the
corrupted run's metric, exactly, at the read-out positions) and ``m(clean)`` is the
unmodified clean run. 1 = the circuit alone carries the whole clean-vs-corrupted refusal
difference; 0 = nothing of it. Values outside [0, 1] happen (e.g. if the circuit
contains refusal-promoting but not refusal-suppressing nodes).

The ratio is only meaningful when the gap ``m(clean) - m(∅)`` is clearly non-zero: the
result reports ``gap_se`` (standard error over pairs) and ``gap_resolved`` (``|gap| >
2·gap_se``); when it is False the recovered values are dominated by noise.

Controls, at every size ``k`` (``k = max(1, round(f · n_nodes))`` for each fraction ``f``):

* ``random``: ``n_random`` uniformly random node sets of size ``k`` (seeds
  ``seed, seed+1, …``), reported per seed and as mean ± sd (sample sd, ddof=1);
* ``shuffled``: the top-``k`` nodes of an attribution run on the *same* prompts with the
  clean/corrupted labels shuffled (``shuffled_scores``, computed by the caller, see
  ``cdelta.circuits.localize.shuffled_pairs``).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from cdelta.circuits.attribution import frozen, iter_pair_batches, patch_metrics
from cdelta.circuits.hooks import ATTN, MLP, node_ids, node_sites
from cdelta.circuits.metric import Metric, get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of

DEFAULT_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
ABLATIONS = ("patch", "mean")


def circuit_sizes(n_nodes: int, fractions=DEFAULT_FRACTIONS) -> list[int]:
    """Node counts for each fraction: ``max(1, round(f · n_nodes))``."""
    return [max(1, min(n_nodes, round(f * n_nodes))) for f in fractions]


def top_nodes(scores: torch.Tensor, k: int, by: str = "abs") -> torch.Tensor:
    """Bool mask ``[n_layers, n_heads + 1]`` of the ``k`` highest-ranked nodes (ties: canonical order)."""
    flat = scores.flatten().double()
    key = flat.abs() if by == "abs" else flat
    order = sorted(range(flat.numel()), key=lambda i: (-float(key[i]), i))
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(scores.shape)


def random_nodes(shape: tuple[int, int], k: int, seed: int) -> torch.Tensor:
    """Bool mask of ``k`` uniformly random nodes; deterministic given ``seed``."""
    n = shape[0] * shape[1]
    chosen = random.Random(seed).sample(range(n), k)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return mask.view(shape)


def _complement_patch(arch: Architecture, in_circuit: torch.Tensor) -> dict:
    """Patch spec (``patch_metric``) for every node outside the circuit."""
    patch = {}
    for layer in range(arch.n_layers):
        heads = ~in_circuit[layer, : arch.n_heads]
        if heads.any():
            patch[(layer, ATTN)] = heads
        if not in_circuit[layer, arch.n_heads]:
            patch[(layer, MLP)] = None
    return patch


@torch.no_grad()
def _mean_sources(model, arch, batches_fn) -> dict:
    """Mean corrupted activation per site over examples and window positions."""
    sums, counts = {}, 0
    for _, pb in batches_fn():
        w = pb.window
        for site in node_sites(arch):
            t = pb.target[site].double()
            m = w.view(*w.shape, *([1] * (t.dim() - 2)))
            sums[site] = sums.get(site, 0) + torch.where(m, t, torch.zeros((), dtype=t.dtype)).sum((0, 1))
        counts += int(w.sum())
    return {site: (v / counts) for site, v in sums.items()}


def evaluate_circuits(
    model: torch.nn.Module,
    tokenizer,
    clean: list[str],
    corrupt: list[str],
    circuits: dict[str, torch.Tensor],
    *,
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    n_positions: int | str | None = "suffix",
    ablation: str = "patch",
    on_pass: Callable[[], None] | None = None,
    max_rows: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-example metric ``[n_pairs]`` for each named circuit mask (complement ablated).

    Also returns ``"__clean__"``, ``"__corrupt__"`` (unmodified runs) and ``"__empty__"``
    (every node ablated).
    """
    if ablation not in ABLATIONS:
        raise CdeltaError(f"unknown ablation '{ablation}'", f"use one of: {', '.join(ABLATIONS)}")
    arch = architecture_of(model)
    metric_obj = get_metric(metric, tokenizer)
    n = len(clean)
    shape = (arch.n_layers, arch.n_heads + 1)
    names = ["__empty__", *circuits]
    masks = {"__empty__": torch.zeros(shape, dtype=torch.bool), **circuits}
    out = {name: torch.zeros(n, dtype=torch.float64) for name in ["__clean__", "__corrupt__", *names]}

    def batches():
        return iter_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions)

    with frozen(model):
        means = _mean_sources(model, arch, batches) if ablation == "mean" else None
        for idx, pb in batches():
            if on_pass:
                on_pass()
                on_pass()
            source = None
            if means is not None:
                source = {site: v.to(pb.target[site].dtype).expand_as(pb.target[site]) for site, v in means.items()}
            out["__clean__"][idx] = pb.m_clean.double().cpu()
            out["__corrupt__"][idx] = pb.m_corrupt.double().cpu()
            specs = [_complement_patch(arch, masks[name]) for name in names]
            for name, m in zip(names, patch_metrics(model, arch, pb, specs, source, max_rows=max_rows)):
                out[name][idx] = m.double().cpu()
                if on_pass:
                    on_pass()
    return out


def count_passes(n_pairs: int, batch_size: int, n_sizes: int, n_random: int, shuffled: bool, ablation: str = "patch") -> int:
    """Progress ticks of ``faithfulness_curve``: two per batch for the clean/corrupted runs, one per evaluated circuit."""
    n_batches = -(-n_pairs // batch_size)
    per_batch = 2 + 1 + n_sizes * (1 + n_random + (1 if shuffled else 0))
    return n_batches * per_batch + (2 * n_batches if ablation == "mean" else 0)


@dataclass(frozen=True)
class Units:
    """What a faithfulness curve keeps: nodes or edges.

    ``top(scores, k, by)`` and ``random(k, seed)``: bool masks of ``k`` units;
    ``evaluate({name: mask})``: per-example metric ``[n_pairs]`` per name plus
    ``__clean__``, ``__corrupt__`` and ``__empty__`` (``evaluate_circuits``);
    ``nodes(mask)``: the node ids a mask keeps; ``header`` / ``counts``: extra result keys
    placed before ``ablation`` / after ``n_pairs``; ``list_shuffled``: also list the
    shuffled control's nodes.
    """

    n_units: int
    top: Callable[[torch.Tensor, int, str], torch.Tensor]
    random: Callable[[int, int], torch.Tensor]
    evaluate: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    nodes: Callable[[torch.Tensor], list[str]]
    header: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)
    list_shuffled: bool = True


def curve(
    units: Units, scores: torch.Tensor, shuffled_scores: torch.Tensor | None, *, fractions, n_random: int, seed: int,
    by: str, ablation: str, n_pairs: int,
) -> dict:
    """Recovered metric at every size ``circuit_sizes(units.n_units, fractions)`` for the top-ranked
    units, ``n_random`` random sets (seeds ``seed, seed+1, …``) and the shuffled-label ranking (JSON-able)."""
    sizes = circuit_sizes(units.n_units, fractions)
    seeds = [seed + i for i in range(n_random)]
    circuits: dict[str, torch.Tensor] = {}
    for k in sizes:
        circuits[f"attr:{k}"] = units.top(scores, k, by)
        for s in seeds:
            circuits[f"random:{k}:{s}"] = units.random(k, s * 1_000_003 + k)
        if shuffled_scores is not None:
            circuits[f"shuffled:{k}"] = units.top(shuffled_scores, k, by)
    values = units.evaluate(circuits)
    m_clean = float(values["__clean__"].mean())
    m_empty = float(values["__empty__"].mean())
    gap = m_clean - m_empty
    per_pair_gap = values["__clean__"] - values["__empty__"]
    gap_se = float(per_pair_gap.std() / len(per_pair_gap) ** 0.5) if len(per_pair_gap) > 1 else float("nan")

    def rec(name: str) -> float:
        return (float(values[name].mean()) - m_empty) / gap if gap != 0 else float("nan")

    random_rec = [[rec(f"random:{k}:{s}") for s in seeds] for k in sizes]
    rand = torch.tensor(random_rec, dtype=torch.float64)
    result = {
        **units.header,
        "ablation": ablation,
        "by": by,
        "n_pairs": n_pairs,
        **units.counts,
        "fractions": list(fractions),
        "sizes": sizes,
        "m_clean": m_clean,
        "m_corrupt": float(values["__corrupt__"].mean()),
        "m_all_ablated": m_empty,
        "gap": gap,
        "gap_se": gap_se,
        "gap_resolved": bool(abs(gap) > 2 * gap_se),
        "circuit": {
            "recovered": [rec(f"attr:{k}") for k in sizes],
            "metric": [float(values[f"attr:{k}"].mean()) for k in sizes],
            "nodes": [units.nodes(circuits[f"attr:{k}"]) for k in sizes],
        },
        "random": {
            "seeds": seeds,
            "recovered": random_rec,
            "mean": rand.mean(1).tolist(),
            "sd": (rand.std(1) if len(seeds) > 1 else torch.zeros(len(sizes))).tolist(),
        },
        "shuffled": None,
    }
    if shuffled_scores is not None:
        result["shuffled"] = {"recovered": [rec(f"shuffled:{k}") for k in sizes]}
        if units.list_shuffled:
            result["shuffled"]["nodes"] = [units.nodes(circuits[f"shuffled:{k}"]) for k in sizes]
    return result


def faithfulness_curve(
    model: torch.nn.Module,
    tokenizer,
    clean: list[str],
    corrupt: list[str],
    scores: torch.Tensor,
    *,
    shuffled_scores: torch.Tensor | None = None,
    fractions=DEFAULT_FRACTIONS,
    n_random: int = 5,
    seed: int = 0,
    by: str = "abs",
    ablation: str = "patch",
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    n_positions: int | str | None = "suffix",
    on_pass: Callable[[], None] | None = None,
) -> dict:
    """Recovered metric vs circuit size for the attributed circuit and its controls (JSON-able).

    ``scores``/``shuffled_scores``: ``[n_layers, n_heads + 1]`` node scores.
    """
    if n_random < 1:
        raise CdeltaError("faithfulness needs at least one random control", "pass n_random >= 1 (5 or more recommended)")
    arch = architecture_of(model)
    shape = (arch.n_layers, arch.n_heads + 1)
    n_nodes = shape[0] * shape[1]
    ids = node_ids(arch)

    def evaluate(circuits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return evaluate_circuits(
            model, tokenizer, clean, corrupt, circuits,
            metric=metric, batch_size=batch_size, n_positions=n_positions, ablation=ablation, on_pass=on_pass,
        )

    units = Units(
        n_units=n_nodes,
        top=top_nodes,
        random=lambda k, s: random_nodes(shape, k, s),
        evaluate=evaluate,
        nodes=lambda mask: [ids[i] for i in mask.flatten().nonzero().flatten().tolist()],
        counts={"n_nodes": n_nodes},
    )
    return curve(units, scores, shuffled_scores, fractions=fractions, n_random=n_random, seed=seed, by=by, ablation=ablation,
                 n_pairs=len(clean))
