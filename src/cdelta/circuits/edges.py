"""Edge circuits: selecting writer → reader edges, their parameters, and their faithfulness.

Graph and parameter components: ``cdelta.circuits.graph``; scores:
``cdelta.circuits.edge_attribution``; patching: ``cdelta.circuits.edge_patching``.

Selection ranks valid edges by ``|score|`` (or the signed score), ties in writer-major
order. The node set implied by an edge set: every writer node of a selected edge, the
head of every selected q-edge, every query head of the group of a selected k/v-edge, and
the MLP of every selected MLP-input edge. An edge circuit's parameters are the components
its edges own (write weights of writers, read weights of readers), not whole nodes.

Faithfulness of an edge circuit ``C`` patches every edge *outside* ``C``: reader ``v`` gets
``x_v - Σ_{u ∉ C} (a_u - a_u^corr)`` with ``a_u`` the writer's value in the same run
(ACDC-style), inside the window; ``m(no edge kept) = m(corrupt)`` and ``m(all kept) =
m(clean)`` exactly. The curve is ``cdelta.circuits.faithfulness.curve`` over edges.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch

from cdelta.circuits import faithfulness as faith_mod
from cdelta.circuits.circuit import Circuit, parse_selection
from cdelta.circuits.edge_attribution import EdgeAttribution
from cdelta.circuits.edge_patching import edge_pair_batches, patch_edges
from cdelta.circuits.graph import (
    EdgeGraph,
    check_edge_model,
    component_param_slices,
    rank_edges,
    slice_numel,
    total_params,
)
from cdelta.circuits.metric import Metric, get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of

EDGE_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
"""Default faithfulness sizes: fractions of all edges."""

N_TOP = 500
"""Edges listed in ``circuit.json`` (best by |score|)."""


# ----------------------------------------------------------------------------- edge circuits


def select_edges(
    scores: torch.Tensor, arch: Architecture, spec: str | dict, model: torch.nn.Module | None = None, by: str = "abs"
) -> torch.Tensor:
    """``[n_writers, n_readers]`` bool: edges chosen by ``top_k:N`` (edges), ``top_frac:F`` (of all
    edges, at least one), ``threshold:S`` (ranking key >= S) or ``params:F``.

    ``params:F`` walks the ranking and adds every edge whose not-yet-owned components still
    fit into a fraction ``F`` of the model's parameters (edges whose components are already
    owned cost nothing and are added, except edges scored exactly 0; needs ``model``).
    """
    sel = parse_selection(spec) if isinstance(spec, str) else spec
    graph = EdgeGraph.of(arch)
    valid = graph.valid()
    order = rank_edges(scores, valid, sel.get("by", by))
    kind, value = sel["kind"], sel["value"]
    if kind == "top_k":
        chosen = order[: max(0, int(value))]
    elif kind == "top_frac":
        chosen = order[: max(1, round(float(value) * len(order)))]
    elif kind == "threshold":
        flat = scores.flatten()[order]
        key = flat.abs() if sel.get("by", by) == "abs" else flat
        chosen = order[key >= value]
    elif kind == "params":
        if model is None:
            raise CdeltaError("a parameter-budget selection needs the model", "pass model=...")
        chosen = _budget_edges(graph, arch, model, order[scores.flatten()[order] != 0], float(value))
    else:
        raise CdeltaError(f"bad edge selection {sel}", "use top_k:N, top_frac:F, threshold:S or params:F")
    mask = torch.zeros(valid.numel(), dtype=torch.bool)
    mask[chosen] = True
    return mask.view(valid.shape)


def _budget_edges(graph: EdgeGraph, arch: Architecture, model, order: torch.Tensor, budget: float) -> torch.Tensor:
    params = dict(model.named_parameters())
    names = set(params)
    limit = budget * total_params(model)
    writer_comp = [graph.writer_component(w) for w in range(graph.n_writers)]
    reader_comp = [graph.reader_component(r) for r in range(graph.n_readers)]
    size: dict[str, int] = {}
    for comp in {c for c in writer_comp + reader_comp if c}:
        size[comp] = sum(slice_numel(params[n].shape, sl) for n, sl in component_param_slices(arch, comp, names))
    used: set[str] = set()
    count, chosen = 0, []
    for e in order.tolist():
        w, r = divmod(e, graph.n_readers)
        new = {c for c in (writer_comp[w], reader_comp[r]) if c and c not in used}
        extra = sum(size[c] for c in new)
        if count + extra <= limit:
            chosen.append(e)
            used |= new
            count += extra
    return torch.tensor(chosen, dtype=torch.long)


def edge_components(graph: EdgeGraph, selected: torch.Tensor) -> list[str]:
    """Parameter components owned by the selected edges (write weights of writers, read weights of readers), sorted."""
    comps = set()
    for w in selected.any(1).nonzero().flatten().tolist():
        comps.add(graph.writer_component(w))
    for r in selected.any(0).nonzero().flatten().tolist():
        comps.add(graph.reader_component(r))
    comps.discard(None)
    return sorted(comps)


def implied_nodes(graph: EdgeGraph, selected: torch.Tensor, order: torch.Tensor | None = None) -> list[str]:
    """Nodes touched by the selected edges (module docstring), in the order of ``order`` (flat edge indices) if given."""
    writers = graph.writers()
    edges = order[selected.flatten()[order]] if order is not None else selected.flatten().nonzero().flatten()
    nodes: dict[str, None] = {}
    for e in edges.tolist():
        w, r = divmod(e, graph.n_readers)
        if w > 0:
            nodes[writers[w]] = None
        for node in graph.reader_nodes(r):
            nodes[node] = None
    return list(nodes)


def edge_circuit(
    result: EdgeAttribution, selection: str | dict, model: torch.nn.Module, /, by: str = "abs", n_top: int = N_TOP, **meta
) -> Circuit:
    """A ``Circuit`` from edge scores: implied nodes, node scores = summed out-edge scores, and
    ``meta["edges"]`` with the selection, its components (which the parameter masks use), a
    summary and the ``n_top`` best edges (``[writer, reader, score, selected]``)."""
    arch, graph = result.arch, result.graph
    sel = parse_selection(selection) if isinstance(selection, str) else dict(selection)
    sel.setdefault("by", by)
    selected = select_edges(result.scores, arch, sel, model=model, by=by)
    order = rank_edges(result.scores, graph.valid(), sel["by"])
    writers, readers = graph.writers(), graph.readers()
    flat = result.scores.flatten()
    top = []
    for e in order[:n_top].tolist():
        w, r = divmod(e, graph.n_readers)
        top.append([writers[w], readers[r], float(flat[e]), bool(selected.flatten()[e])])
    kinds = {"q": 0, "k": 0, "v": 0, "mlp": 0, "output": 0}
    for r, count in enumerate(selected.sum(0).tolist()):
        name = readers[r]
        kind = "output" if name == "output" else "mlp" if name.endswith("MLP") else name[-1]
        kinds[kind] += count
    mass = flat.abs().sum()
    edges = {
        "n_writers": graph.n_writers,
        "n_readers": graph.n_readers,
        "n_edges": graph.n_edges,
        "kv_readers": "k/v readers are per key/value head (shared by its query heads under GQA)",
        "selection": sel,
        "n_selected": int(selected.sum()),
        "selected_by_reader": kinds,
        "selected_abs_fraction": float(flat[selected.flatten()].abs().sum() / mass) if mass > 0 else 0.0,
        "components": edge_components(graph, selected),
        "top": top,
    }
    base = Circuit.from_scores(arch, result.node_scores(), **meta)
    circuit = Circuit(base.n_layers, base.n_heads, base.scores, implied_nodes(graph, selected, order), dict(base.meta, selection=sel, edges=edges))
    circuit.meta.update(n_params=circuit.n_params(model), param_fraction=circuit.fraction(model))
    return circuit


# ----------------------------------------------------------------------------- faithfulness


def top_edges(scores: torch.Tensor, valid: torch.Tensor, k: int, by: str = "abs") -> torch.Tensor:
    """Bool ``[n_writers, n_readers]`` of the ``k`` best valid edges."""
    mask = torch.zeros(valid.numel(), dtype=torch.bool)
    mask[rank_edges(scores, valid, by)[:k]] = True
    return mask.view(valid.shape)


def random_edges(valid: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Bool mask of ``k`` uniformly random valid edges; deterministic given ``seed``."""
    idx = valid.flatten().nonzero().flatten().tolist()
    mask = torch.zeros(valid.numel(), dtype=torch.bool)
    mask[random.Random(seed).sample(idx, k)] = True
    return mask.view(valid.shape)


def evaluate_edge_circuits(
    model: torch.nn.Module,
    tokenizer,
    clean: list[str],
    corrupt: list[str],
    circuits: dict[str, torch.Tensor],
    *,
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    n_positions: int | str | None = "suffix",
    on_pass: Callable[[], None] | None = None,
    max_rows: int = 64,
) -> dict[str, torch.Tensor]:
    """Per-example metric ``[n_pairs]`` for each named edge circuit (every other edge patched).

    Also returns ``"__clean__"``, ``"__corrupt__"`` and ``"__empty__"`` (every edge patched).
    """
    arch = architecture_of(model)
    check_edge_model(arch)
    graph = EdgeGraph.of(arch)
    metric_obj = get_metric(metric, tokenizer)
    names = ["__empty__", *circuits]
    kept = {"__empty__": torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.bool), **circuits}
    out = {name: torch.zeros(len(clean), dtype=torch.float64) for name in ["__clean__", "__corrupt__", *names]}
    for w, idx, pb in edge_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions, on_pass):
        out["__clean__"][idx] = pb.m_clean.double().cpu()
        out["__corrupt__"][idx] = pb.m_corrupt.double().cpu()
        specs = [~kept[name] for name in names]
        for name, m in zip(names, patch_edges(model, arch, pb, specs, max_rows=max_rows, weights=w)):
            out[name][idx] = m.double().cpu()
            if on_pass:
                on_pass()
    return out


def edge_faithfulness_curve(
    model: torch.nn.Module,
    tokenizer,
    clean: list[str],
    corrupt: list[str],
    scores: torch.Tensor,
    *,
    shuffled_scores: torch.Tensor | None = None,
    fractions=EDGE_FRACTIONS,
    n_random: int = 5,
    seed: int = 0,
    by: str = "abs",
    ablation: str = "patch",
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    n_positions: int | str | None = "suffix",
    on_pass: Callable[[], None] | None = None,
) -> dict:
    """Recovered metric vs number of edges kept, against random and shuffled-label edge sets.

    Same keys as ``cdelta.circuits.faithfulness.faithfulness_curve`` plus ``unit="edges"``
    and ``n_edges``; ``sizes`` count edges, ``circuit.nodes`` lists the implied nodes.
    ``scores``/``shuffled_scores``: ``[n_writers, n_readers]``. Only ``ablation="patch"``.
    """
    if ablation != "patch":
        raise CdeltaError(f"edge faithfulness supports only patch ablation, not '{ablation}'", "use ablation='patch'")
    if n_random < 1:
        raise CdeltaError("faithfulness needs at least one random control", "pass n_random >= 1 (5 or more recommended)")
    arch = architecture_of(model)
    graph = EdgeGraph.of(arch)
    valid = graph.valid()

    def evaluate(circuits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return evaluate_edge_circuits(
            model, tokenizer, clean, corrupt, circuits, metric=metric, batch_size=batch_size, n_positions=n_positions, on_pass=on_pass,
        )

    units = faith_mod.Units(
        n_units=graph.n_edges,
        top=lambda s, k, by: top_edges(s, valid, k, by),
        random=lambda k, s: random_edges(valid, k, s),
        evaluate=evaluate,
        nodes=lambda mask: implied_nodes(graph, mask),
        header={"unit": "edges"},
        counts={"n_edges": graph.n_edges, "n_nodes": arch.n_layers * (arch.n_heads + 1)},
        list_shuffled=False,
    )
    return faith_mod.curve(units, scores, shuffled_scores, fractions=fractions, n_random=n_random, seed=seed, by=by,
                           ablation=ablation, n_pairs=len(clean))
