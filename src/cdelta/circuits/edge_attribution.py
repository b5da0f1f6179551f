"""Edge attribution: which writer → reader edges carry the clean-vs-corrupted refusal difference.

Graph, writers ``u`` and readers ``v``: ``cdelta.circuits.graph``. For clean/corrupted
pairs and window positions as in ``cdelta.circuits.attribution``::

    score(u → v) = mean over pairs of  Σ_{window positions} (a_u^clean - a_u^corr) · ∂m/∂x_v

``∂m/∂x_v`` is the gradient with respect to reader ``v``'s private residual copy. It is
obtained from one backward pass: the gradient at the projection output of ``v`` (its rows
of ``q_proj``/``k_proj``/``v_proj``, the MLP's input, the final norm's output) is pulled
back through the projection rows and then through ``v``'s norm at the current residual
(vector-Jacobian product of the norm module, evaluated per reader).
**Positive = the edge supports refusal on the clean prompts relative to the corrupted ones.**

``eap``
    One gradient at the clean run.
``eap-ig`` (default)
    The node-level joint path of ``cdelta.circuits.attribution`` (every head, MLP *and* the
    token embeddings set to ``a_corr + α (a_clean - a_corr)`` inside the window, gradients
    passing straight through), averaged over midpoint ``α``; ``steps`` passes.
``exact``
    Edge activation patching (``cdelta.circuits.edge_patching``): for each edge one forward
    pass of the clean prompt in which only reader ``v`` gets ``x_v - (a_u - a_u^corr)``
    (every other reader untouched); ``score = m(clean) - m(patched)``. ``n_edges`` runs
    (batched): ground truth for tests.

Single-edge patching moves one reader's input by one writer's difference, a small step
from the clean run, which one gradient (``eap``) estimates; joint ``eap-ig`` instead
apportions the whole clean-to-corrupted difference along a path on which everything moves.

Identities (tested)
-------------------
* Summed over readers, the edge scores out of a node equal the node's attribution with the
  same method (``attribute(..., method="eap")``; ``"eap-ig"`` too where the token embeddings
  do not differ inside the window, i.e. ``n_positions="suffix"``): a node's output reaches
  the metric only through the readers downstream of it.
* ``eap-ig``: the scores into ``output`` sum to ``m(clean) - m(corrupt)`` up to the Riemann
  error, because at every ``α`` the final residual in the window is exactly the
  interpolation of its clean and corrupted values.
* ``eap`` equals a central finite difference of edge patching.

Compute and memory
------------------
Per pass: a forward/backward of the window positions (prefix KV cache as for nodes), then
per layer a ``[writers, rows·positions·d] @ [rows·positions·d, readers of the layer]``
product; edge scores are one ``[n_writers, n_readers]`` float64 matrix, no per-example
edge scores are kept. Writer differences (``rows × n_writers × positions × d``) are
processed in position chunks of at most ``CHUNK_ELEMENTS`` elements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from cdelta.circuits.attribution import (
    OnPass,
    PairBatch,
    _Interpolate,
    check_positions,
    midpoint_alphas,
)
from cdelta.circuits.edge_patching import EdgeWeights, chunk_len, edge_pair_batches, patch_edges, writer_acts
from cdelta.circuits.graph import EdgeGraph, check_edge_model, rank_edges
from cdelta.circuits.hooks import EMBED_SITE, node_sites
from cdelta.circuits.metric import Metric, get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of, attn_proj, mlp

EDGE_METHODS = ("eap", "eap-ig", "exact")


def _norm_vjp(norm: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ grad_y`` for several readers sharing one norm.

    ``x``: ``[rows, T, d]`` residual; ``grad_y``: ``[rows, T, R, d]`` gradients at the norm's
    output, one per reader. Returns ``[rows, T, R, d]``.
    """
    with torch.enable_grad():
        xe = x.detach().unsqueeze(2).expand_as(grad_y).contiguous().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(norm.forward(xe), xe, grad_y)
    return grad_x


class _Taps:
    """Forward hooks keeping what reader gradients need: residuals entering each norm (values)
    and the live q/k/v projection outputs, MLP inputs and final-norm output (for autograd)."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, weights: EdgeWeights) -> None:
        self.model, self.arch, self.weights = model, arch, weights
        self.x_attn: dict[int, torch.Tensor] = {}
        self.x_mlp: dict[int, torch.Tensor] = {}
        self.x_out: torch.Tensor | None = None
        self.live: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> _Taps:
        w, add = self.weights, self._handles.append
        for layer in range(self.arch.n_layers):
            add(w.attn_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_attn.__setitem__(layer, args[0].detach())))
            add(w.mlp_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_mlp.__setitem__(layer, args[0].detach())))
            for name in ("q", "k", "v"):
                add(attn_proj(self.model, layer, name).register_forward_hook(
                    lambda m, args, out, key=(name, layer): self.live.__setitem__(key, out)))
            add(mlp(self.model, layer).register_forward_pre_hook(lambda m, args, layer=layer: self.live.__setitem__(("mlp", layer), args[0])))
        add(w.final_norm.register_forward_pre_hook(lambda m, args: setattr(self, "x_out", args[0].detach())))
        add(w.final_norm.register_forward_hook(lambda m, args, out: self.live.__setitem__(("out", 0), out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _reader_grads(w: EdgeWeights, taps: _Taps, grads: dict, layer: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients at the private residual copies of layer ``layer``'s readers, positions ``sl``.

    Returns attention readers ``[rows, Tc, n_heads + 2·n_kv_heads, d]`` (q heads, k heads,
    v heads) and the MLP reader ``[rows, Tc, 1, d]``.
    """
    parts = []
    for name, weight in (("q", w.q[layer]), ("k", w.k[layer]), ("v", w.v[layer])):
        g = grads[(name, layer)][:, sl]
        parts.append(torch.einsum("rthk,hkd->rthd", g.view(*g.shape[:2], weight.shape[0], weight.shape[1]), weight))
    attn = _norm_vjp(w.attn_norm[layer], taps.x_attn[layer][:, sl], torch.cat(parts, dim=2))
    mlp_in = _norm_vjp(w.mlp_norm[layer], taps.x_mlp[layer][:, sl], grads[("mlp", layer)][:, sl, None, :])
    return attn, mlp_in


def _accumulate(scores: torch.Tensor, deltas: torch.Tensor, n_up: int, readers: slice | int, grad_x: torch.Tensor) -> None:
    """``scores[:n_up, readers] += Σ_{rows, positions, d} deltas[:n_up] · grad_x``.

    ``deltas``: ``[n_writers, rows, Tc, d]``; ``grad_x``: ``[rows, Tc, R, d]``.
    """
    flat = deltas[:n_up].reshape(n_up, -1)
    g = grad_x.permute(0, 1, 3, 2).reshape(flat.shape[1], -1)
    block = (flat @ g.to(flat.dtype)).double().cpu()
    if isinstance(readers, int):
        scores[:n_up, readers] += block[:, 0]
    else:
        scores[:n_up, readers] += block


class _Deltas:
    """``a_clean - a_corr`` per writer inside the window, ``[n_writers, rows, Tc, d]`` per position chunk (cached when small)."""

    def __init__(self, graph: EdgeGraph, weights: EdgeWeights, pb: PairBatch) -> None:
        self.graph, self.weights, self.pb = graph, weights, pb
        rows, width = pb.window.shape
        d = weights.o[0].shape[0]
        self.step = chunk_len(rows, graph, width, d)
        self.bounds = [(t, min(width, t + self.step)) for t in range(0, width, self.step)]
        self._cache = [self._compute(t0, t1) for t0, t1 in self.bounds] if len(self.bounds) == 1 else None

    def _compute(self, t0: int, t1: int) -> torch.Tensor:
        pb = self.pb
        site_diff = {site: pb.clean_acts[site] - pb.target[site] for site in pb.clean_acts}  # writer_acts is linear
        diff = writer_acts(self.graph, self.weights, site_diff, t0, t1)
        diff *= pb.window[:, None, t0:t1, None].to(diff.dtype)
        return diff.transpose(0, 1).contiguous()

    def chunks(self):
        """Yields ``(slice of positions, deltas)``."""
        for i, (t0, t1) in enumerate(self.bounds):
            yield slice(t0, t1), (self._cache[i] if self._cache is not None else self._compute(t0, t1))


def _gradient_pass(model, arch, graph: EdgeGraph, w: EdgeWeights, pb: PairBatch, deltas: _Deltas, alpha: float | None) -> torch.Tensor:
    """One forward + backward; returns ``[n_writers, n_readers]`` summed over the batch's examples.

    ``alpha=None``: the clean run (EAP); else every node and the embeddings are interpolated
    to ``a_corr + α (a_clean - a_corr)`` in the window (straight-through gradients).
    """
    cut = {} if alpha is None else {site: None for site in [EMBED_SITE, *node_sites(arch)]}
    handler = _Interpolate(pb, 1.0 if alpha is None else alpha, cut, (), straight_through=True)
    with torch.enable_grad(), _Taps(model, arch, w) as taps:
        m = pb.forward(model, arch, handler, grad_root=True)
        keys = list(taps.live)
        got = torch.autograd.grad(m.sum(), [taps.live[k] for k in keys], allow_unused=True)
    grads = {k: (g if g is not None else torch.zeros_like(taps.live[k])) for k, g in zip(keys, got)}
    scores = torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.float64)
    for sl, delta in deltas.chunks():
        for layer in range(arch.n_layers):
            attn_g, mlp_g = _reader_grads(w, taps, grads, layer, sl)
            _accumulate(scores, delta, graph.attn_upstream(layer), graph.attn_readers(layer), attn_g)
            _accumulate(scores, delta, graph.mlp_upstream(layer), graph.reader_mlp(layer), mlp_g)
        out_g = _norm_vjp(w.final_norm, taps.x_out[:, sl], grads[("out", 0)][:, sl, None, :])
        _accumulate(scores, delta, graph.n_writers, graph.output, out_g)
    return scores


@dataclass
class EdgeAttribution:
    """Edge scores of one run.

    ``scores``: ``[n_writers, n_readers]`` float64, mean over pairs (0 where no edge exists);
    ``m_clean``/``m_corrupt``: per-pair metric of the unmodified runs.
    """

    arch: Architecture
    scores: torch.Tensor
    method: str
    steps: int
    metric: dict
    n_positions: int | str | None
    m_clean: torch.Tensor
    m_corrupt: torch.Tensor
    seconds: float

    @property
    def graph(self) -> EdgeGraph:
        return EdgeGraph.of(self.arch)

    def node_matrix(self) -> torch.Tensor:
        """``[n_layers, n_heads + 1]``: each node's out-edge scores summed (= its node attribution)."""
        sums = self.scores.sum(1)[1:]
        return sums.view(self.arch.n_layers, self.arch.n_heads + 1)

    def node_scores(self) -> dict[str, float]:
        """``{node_id: summed out-edge score}`` in canonical node order."""
        return dict(zip(self.graph.writers()[1:], self.node_matrix().flatten().tolist()))

    def top(self, k: int, by: str = "abs") -> list[tuple[str, str, float]]:
        """The ``k`` best edges ``(writer, reader, score)``."""
        graph = self.graph
        writers, readers = graph.writers(), graph.readers()
        order = rank_edges(self.scores, graph.valid(), by)[:k]
        n_r = graph.n_readers
        return [(writers[i // n_r], readers[i % n_r], float(self.scores.flatten()[i])) for i in order.tolist()]


def count_passes(method: str, arch: Architecture, n_pairs: int, batch_size: int, steps: int) -> int:
    """Progress ticks of ``attribute_edges``: two per batch for the clean/corrupted runs, then one per pass (per edge for ``exact``)."""
    per_batch = {"eap": 1, "eap-ig": steps, "exact": EdgeGraph.of(arch).n_edges}[method]
    return -(-n_pairs // batch_size) * (2 + per_batch)


def _exact_scores(model, arch, graph: EdgeGraph, w: EdgeWeights, pb: PairBatch, max_rows: int, on_pass: OnPass) -> torch.Tensor:
    """``[n_writers, n_readers]`` summed over the batch's examples: ``m(clean) - m(only that edge patched)``."""
    edges = graph.valid().flatten().nonzero().flatten().tolist()
    specs = [torch.zeros(graph.n_writers * graph.n_readers, dtype=torch.bool) for _ in edges]
    for spec, e in zip(specs, edges):
        spec[e] = True
    scores = torch.zeros(graph.n_writers * graph.n_readers, dtype=torch.float64)
    m0 = pb.m_clean.double().cpu().sum()
    patched = patch_edges(model, arch, pb, [s.view(graph.n_writers, graph.n_readers) for s in specs], max_rows=max_rows, weights=w)
    for e, m in zip(edges, patched):
        scores[e] = m0 - m.double().cpu().sum()
        if on_pass:
            on_pass()
    return scores.view(graph.n_writers, graph.n_readers)


def attribute_edges(
    model: torch.nn.Module,
    tokenizer,
    clean: list[str],
    corrupt: list[str],
    *,
    method: str = "eap-ig",
    steps: int = 5,
    metric: str | Metric = "logodds",
    batch_size: int = 8,
    n_positions: int | str | None = "suffix",
    on_pass: OnPass = None,
    exact_rows: int = 64,
) -> EdgeAttribution:
    """Score every writer → reader edge for the clean-vs-corrupted refusal difference (module docstring)."""
    if method not in EDGE_METHODS:
        raise CdeltaError(f"unknown edge attribution method '{method}'", f"use one of: {', '.join(EDGE_METHODS)}")
    if len(clean) != len(corrupt) or not clean:
        raise CdeltaError(f"need equally many clean and corrupted prompts (got {len(clean)} and {len(corrupt)})", "pass paired lists")
    if steps < 1:
        raise CdeltaError("steps must be at least 1", "pass steps >= 1")
    check_positions(n_positions)
    arch = architecture_of(model)
    check_edge_model(arch)
    graph = EdgeGraph.of(arch)
    metric_obj = get_metric(metric, tokenizer)
    total = torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.float64)
    n = len(clean)
    m_clean, m_corrupt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    start = time.perf_counter()
    for w, idx, pb in edge_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions, on_pass):
        if method == "exact":
            total += _exact_scores(model, arch, graph, w, pb, exact_rows, on_pass)
        else:
            deltas = _Deltas(graph, w, pb)
            alphas = [None] if method == "eap" else midpoint_alphas(steps)
            for alpha in alphas:
                total += _gradient_pass(model, arch, graph, w, pb, deltas, alpha) / len(alphas)
                if on_pass:
                    on_pass()
        m_clean[idx] = pb.m_clean.double().cpu()
        m_corrupt[idx] = pb.m_corrupt.double().cpu()
    return EdgeAttribution(
        arch=arch,
        scores=total / n,
        method=method,
        steps=steps if method == "eap-ig" else 1,
        metric=metric_obj.describe(),
        n_positions=n_positions,
        m_clean=m_clean,
        m_corrupt=m_corrupt,
        seconds=time.perf_counter() - start,
    )
