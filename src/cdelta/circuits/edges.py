"""Edge attribution: which residual-stream writer → reader connections carry the refusal difference.

Graph
-----
In a pre-norm decoder (llama, qwen2, mistral) the residual stream entering any module is
the sum of everything written before it, so every module's input decomposes into
per-writer contributions. **Writers** ``u`` (``n_writers = 1 + n_layers·(n_heads + 1)``,
forward order):

* ``input``: the token embeddings;
* ``L{l}.H{h}``: head ``h``'s contribution to the residual, ``z_h · W_O[:, h·hd:(h+1)·hd]ᵀ``
  (``z_h`` = its slice of ``o_proj``'s input; the families handled here have no ``o_proj`` bias);
* ``L{l}.MLP``: the MLP block's output.

**Readers** ``v`` (``n_readers = n_layers·(n_heads + 2·n_kv_heads + 1) + 1``):

* ``L{l}.H{h}.q``: the input of query head ``h`` (its rows of ``q_proj``), one per *query* head;
* ``L{l}.KV{g}.k`` and ``L{l}.KV{g}.v``: the inputs of key and value head ``g`` (its rows of
  ``k_proj``/``v_proj``), one per *key/value* head. Under grouped-query attention the keys
  and values of head ``g`` are computed once from one input and shared by the query heads
  ``g·group … (g+1)·group - 1``; that single input is what can be patched and what the edit
  can change (``k_proj``/``v_proj`` rows are per kv head), so readers follow it. A per-query
  head split of k/v would need rewriting the attention kernel and would not map onto
  parameters. Without GQA, ``KV{g}`` is head ``g``.
* ``L{l}.MLP``: the MLP's input;
* ``output``: the final norm's input (the logits).

Reader ``v`` sees its own copy of the residual, ``x_v = Σ_{u upstream of v} a_u``, and
applies its own norm (``input_layernorm`` for q/k/v, ``post_attention_layernorm`` for the
MLP, the final norm for ``output``). A writer is upstream of a reader if it writes before
the reader reads: heads of layer ``l`` feed ``L{l}.MLP`` and every reader of later layers,
the MLP of layer ``l`` feeds readers of later layers and ``output``. SmolLM2-135M has 301
writers, 481 readers and 70,651 edges.

Scores
------
For clean/corrupted pairs and window positions as in ``cdelta.circuits.attribution``::

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
    Edge activation patching: for each edge one forward pass of the clean prompt in which
    only reader ``v`` gets ``x_v - (a_u - a_u^corr)`` (every other reader untouched);
    ``score = m(clean) - m(patched)``. ``n_edges`` runs (batched): ground truth for tests,
    far too slow for real models (70k edges on SmolLM2).

Single-edge patching moves one reader's input by one writer's difference, a small step
from the clean run, which one gradient (``eap``) estimates well; joint ``eap-ig`` instead
apportions the whole clean-to-corrupted difference along a path on which everything moves.
On tiny float64 models at the default init scale both rank edges like ``exact`` (Spearman
>= 0.93, tested); with 3.5x larger weights ``eap`` still gets 0.98 but ``eap-ig`` 0.73 on
llama (0.99 on qwen2). ``eap-ig`` stays the default for consistency with node
localization, where it gave the more faithful circuits.

Identities (tested)
-------------------
* Summed over readers, the edge scores out of a node equal the node's attribution with the
  same method (``attribute(..., method="eap")``; ``"eap-ig"`` too where the token embeddings
  do not differ inside the window, i.e. ``n_positions="suffix"``): a node's output reaches
  the metric only through the readers downstream of it.
* ``eap-ig``: the scores into ``output`` sum to ``m(clean) - m(corrupt)`` up to the Riemann
  error, because at every ``α`` the final residual in the window is exactly the
  interpolation of its clean and corrupted values.
* Patching every edge out of a node equals patching the node; patching every edge gives the
  corrupted metric; ``eap`` equals a central finite difference of edge patching.

Edge circuits and parameters
----------------------------
An edge ``u → v`` owns the *write* weights of ``u`` and the *read* weights of ``v``
("components"): ``L{l}.H{h}.o`` (head ``h``'s columns of ``o_proj``), ``L{l}.MLP.out``
(``down_proj``), ``L{l}.H{h}.q`` (its rows of ``q_proj``, and bias), ``L{l}.KV{g}.k`` /
``.v`` (rows of ``k_proj``/``v_proj``, and bias), ``L{l}.MLP.in`` (``gate_proj`` and
``up_proj``); ``input`` and ``output`` own nothing (embeddings, final norm and LM head are
never edited). So a head whose only selected edges are q-edges contributes only its q rows.
The union of a head's components is exactly the node's parameter set of
``cdelta.circuits.circuit``. The node set implied by an edge set: every writer node of a
selected edge, the head of every selected q-edge, every query head of the group of a
selected k/v-edge, and the MLP of every selected MLP-input edge.

Faithfulness of an edge circuit ``C`` patches every edge *outside* ``C``: reader ``v`` gets
``x_v - Σ_{u ∉ C} (a_u - a_u^corr)`` with ``a_u`` the writer's value in the same run
(ACDC-style), inside the window; ``m(no edge kept) = m(corrupt)`` and ``m(all kept) =
m(clean)`` exactly.

Compute and memory
------------------
Per pass: a forward/backward of the window positions (prefix KV cache as for nodes), then
per layer a ``[writers, rows·positions·d] @ [rows·positions·d, readers of the layer]``
product; edge scores are one ``[n_writers, n_readers]`` float64 matrix (1.2 MB for SmolLM2),
no per-example edge scores are kept. Writer differences are ``rows × n_writers × positions
× d``; positions are processed in chunks of at most ``CHUNK_ELEMENTS`` elements. Patching
keeps the current run's writer differences (``rows × n_writers × positions × d`` per
circuit) and replicates rows for several circuits per pass up to the same element budget;
each reader group's shift costs ``min(#patched, #kept edges) × rows·positions·d``.
"""

from __future__ import annotations

import copy
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdelta.circuits import faithfulness as faith_mod
from cdelta.circuits.attribution import (
    OnPass,
    PairBatch,
    _Interpolate,
    check_positions,
    frozen,
    iter_pair_batches,
    midpoint_alphas,
)
from cdelta.circuits.circuit import Circuit, Slice, _slice_numel, parse_selection, total_params
from cdelta.circuits.hooks import ATTN, EMBED_SITE, MLP, node_sites, run_with_handler
from cdelta.circuits.metric import Metric, get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of, attention, decoder_layers, mlp

EDGE_METHODS = ("eap", "eap-ig", "exact")
EDGE_MODEL_TYPES = ("llama", "qwen2", "mistral")
EDGE_FRACTIONS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
"""Default faithfulness sizes: fractions of all edges (SmolLM2: 71 … 21,195 edges)."""

CHUNK_ELEMENTS = 2**25
"""Largest writer-difference tensor (elements) held at once: 128 MB in float32."""

N_TOP = 500
"""Edges listed in ``circuit.json`` (best by |score|)."""


# ----------------------------------------------------------------------------- the graph


@dataclass(frozen=True)
class EdgeGraph:
    """Index bookkeeping of writers and readers (see module docstring for the order)."""

    n_layers: int
    n_heads: int
    n_kv_heads: int

    @classmethod
    def of(cls, arch: Architecture) -> EdgeGraph:
        return cls(arch.n_layers, arch.n_heads, arch.n_kv_heads)

    @property
    def per_layer(self) -> int:
        """Readers per layer: q heads, k heads, v heads, MLP."""
        return self.n_heads + 2 * self.n_kv_heads + 1

    @property
    def n_writers(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_readers(self) -> int:
        return self.n_layers * self.per_layer + 1

    @property
    def output(self) -> int:
        """Reader index of ``output``."""
        return self.n_layers * self.per_layer

    def writer_head(self, layer: int, head: int) -> int:
        return 1 + layer * (self.n_heads + 1) + head

    def writer_mlp(self, layer: int) -> int:
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def attn_readers(self, layer: int) -> slice:
        """Reader indices of layer ``layer``'s q heads, then k heads, then v heads."""
        start = layer * self.per_layer
        return slice(start, start + self.n_heads + 2 * self.n_kv_heads)

    def reader_mlp(self, layer: int) -> int:
        return layer * self.per_layer + self.n_heads + 2 * self.n_kv_heads

    def attn_upstream(self, layer: int) -> int:
        """Writers feeding layer ``layer``'s attention readers (a prefix of the writer order)."""
        return 1 + layer * (self.n_heads + 1)

    def mlp_upstream(self, layer: int) -> int:
        return self.attn_upstream(layer) + self.n_heads

    def writer_id(self, w: int) -> str:
        """``input``, ``L{l}.H{h}`` or ``L{l}.MLP``."""
        if w == 0:
            return "input"
        layer, col = divmod(w - 1, self.n_heads + 1)
        return f"L{layer}.MLP" if col == self.n_heads else f"L{layer}.H{col}"

    def reader_id(self, r: int) -> str:
        """``L{l}.H{h}.q``, ``L{l}.KV{g}.k``, ``L{l}.KV{g}.v``, ``L{l}.MLP`` or ``output``."""
        if r == self.output:
            return "output"
        layer, col = divmod(r, self.per_layer)
        h, kv = self.n_heads, self.n_kv_heads
        if col < h:
            return f"L{layer}.H{col}.q"
        if col < h + 2 * kv:
            return f"L{layer}.KV{(col - h) % kv}.{'k' if col < h + kv else 'v'}"
        return f"L{layer}.MLP"

    def writers(self) -> list[str]:
        return [self.writer_id(w) for w in range(self.n_writers)]

    def readers(self) -> list[str]:
        return [self.reader_id(r) for r in range(self.n_readers)]

    def n_upstream(self) -> torch.Tensor:
        """``[n_readers]`` long: how many writers (a prefix) feed each reader."""
        out = torch.empty(self.n_readers, dtype=torch.long)
        for layer in range(self.n_layers):
            out[self.attn_readers(layer)] = self.attn_upstream(layer)
            out[self.reader_mlp(layer)] = self.mlp_upstream(layer)
        out[self.output] = self.n_writers
        return out

    def valid(self) -> torch.Tensor:
        """``[n_writers, n_readers]`` bool: the edges that exist (writer upstream of reader)."""
        return torch.arange(self.n_writers)[:, None] < self.n_upstream()[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.valid().sum())

    # ------------------------------------------------------------------ parameter components
    def writer_component(self, w: int) -> str | None:
        """Write weights of writer ``w``: ``L{l}.H{h}.o``, ``L{l}.MLP.out`` or None (``input``)."""
        return None if w == 0 else self.writer_id(w) + (".out" if self.writer_id(w).endswith("MLP") else ".o")

    def reader_component(self, r: int) -> str | None:
        """Read weights of reader ``r``: its q/k/v rows, ``L{l}.MLP.in`` or None (``output``)."""
        if r == self.output:
            return None
        rid = self.reader_id(r)
        return rid + ".in" if rid.endswith(".MLP") else rid

    def reader_nodes(self, r: int) -> list[str]:
        """Nodes whose parameters read through reader ``r`` (a k/v reader: every query head of its group)."""
        if r == self.output:
            return []
        layer, col = divmod(r, self.per_layer)
        h, kv = self.n_heads, self.n_kv_heads
        if col < h:
            return [f"L{layer}.H{col}"]
        if col < h + 2 * kv:
            g = (col - h) % kv
            group = h // kv
            return [f"L{layer}.H{q}" for q in range(g * group, (g + 1) * group)]
        return [f"L{layer}.MLP"]


def _check_model(arch: Architecture) -> None:
    if arch.model_type not in EDGE_MODEL_TYPES:
        raise CdeltaError(
            f"edge attribution supports plain pre-norm layers ({', '.join(EDGE_MODEL_TYPES)}), not '{arch.model_type}' "
            "(its extra norms make head outputs non-additive in the residual stream)",
            "use node-level localization (without --edges) for this model",
        )


_COMPONENT = re.compile(r"L(\d+)\.(?:H(\d+)\.([qo])|KV(\d+)\.([kv])|MLP\.(in|out))")


def component_param_slices(arch: Architecture, component: str, param_names: set[str]) -> list[tuple[str, Slice]]:
    """``[(param_name, (dim, start, stop))]`` owned by one edge component (see module docstring)."""
    m = _COMPONENT.fullmatch(component)
    bad = CdeltaError(f"bad or foreign edge component '{component}'", "use a circuit made for this model")
    if m is None or int(m.group(1)) >= arch.n_layers:
        raise bad
    layer, hd = int(m.group(1)), arch.head_dim
    if m.group(6):
        projs = ("gate", "up") if m.group(6) == "in" else ("down",)
        names = [arch.mlp_param(layer, p) for p in projs] + [arch.mlp_bias_param(layer, p) for p in projs]
        return [(n, (0, 0, -1)) for n in names if n in param_names]
    head, proj = (int(m.group(2)), m.group(3)) if m.group(2) else (int(m.group(4)), m.group(5))
    if head >= (arch.n_heads if proj in ("q", "o") else arch.n_kv_heads):
        raise bad
    rows = (head * hd, (head + 1) * hd)
    if proj == "o":
        return [(arch.attn_param(layer, "o"), (1, *rows))]
    bias = arch.attn_bias_param(layer, proj)
    return [(arch.attn_param(layer, proj), (0, *rows))] + ([(bias, (0, *rows))] if bias in param_names else [])


# ----------------------------------------------------------------------------- model pieces


@dataclass
class _Weights:
    """Per-layer projection weights viewed per head, and the norm modules of every reader."""

    q: list[torch.Tensor]  # [n_heads, hd, d]
    k: list[torch.Tensor]  # [n_kv_heads, hd, d]
    v: list[torch.Tensor]
    q_bias: list[torch.Tensor | None]  # [n_heads, hd]
    k_bias: list[torch.Tensor | None]
    v_bias: list[torch.Tensor | None]
    o: list[torch.Tensor]  # [d, n_heads, hd]
    attn_norm: list[torch.nn.Module]
    mlp_norm: list[torch.nn.Module]
    final_norm: torch.nn.Module

    @classmethod
    def of(cls, model: torch.nn.Module, arch: Architecture) -> _Weights:
        h, kv, hd, d = arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.d_model
        layers = decoder_layers(model)
        attn = [attention(model, layer) for layer in range(arch.n_layers)]

        def bias(module, n):
            return None if module.bias is None else module.bias.detach().view(n, hd)

        inner = model.model
        return cls(
            q=[a.q_proj.weight.detach().view(h, hd, d) for a in attn],
            k=[a.k_proj.weight.detach().view(kv, hd, d) for a in attn],
            v=[a.v_proj.weight.detach().view(kv, hd, d) for a in attn],
            q_bias=[bias(a.q_proj, h) for a in attn],
            k_bias=[bias(a.k_proj, kv) for a in attn],
            v_bias=[bias(a.v_proj, kv) for a in attn],
            o=[a.o_proj.weight.detach().view(d, h, hd) for a in attn],
            attn_norm=[layer.input_layernorm for layer in layers],
            mlp_norm=[layer.post_attention_layernorm for layer in layers],
            final_norm=getattr(inner, "language_model", inner).norm,
        )


def writer_acts(graph: EdgeGraph, weights: _Weights, acts: dict, t0: int = 0, t1: int | None = None) -> torch.Tensor:
    """Residual contributions of every writer, ``[rows, n_writers, t1 - t0, d]``.

    ``acts``: site activations as recorded by ``cdelta.circuits.hooks.Recorder`` (embeddings
    ``[rows, T, d]``, head outputs ``[rows, T, n_heads, hd]``, MLP outputs ``[rows, T, d]``).
    """
    emb = acts[EMBED_SITE][:, t0:t1]
    rows, width, d = emb.shape
    out = emb.new_empty((rows, graph.n_writers, width, d))
    out[:, 0] = emb
    for layer in range(graph.n_layers):
        start = graph.writer_head(layer, 0)
        out[:, start : start + graph.n_heads] = torch.einsum("rthk,dhk->rhtd", acts[(layer, ATTN)][:, t0:t1], weights.o[layer])
        out[:, graph.writer_mlp(layer)] = acts[(layer, MLP)][:, t0:t1]
    return out


def _norm_vjp(norm: torch.nn.Module, x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """``J_norm(x)ᵀ grad_y`` for several readers sharing one norm.

    ``x``: ``[rows, T, d]`` residual; ``grad_y``: ``[rows, T, R, d]`` gradients at the norm's
    output, one per reader. Returns ``[rows, T, R, d]``.
    """
    with torch.enable_grad():
        xe = x.detach().unsqueeze(2).expand_as(grad_y).contiguous().requires_grad_(True)
        (grad_x,) = torch.autograd.grad(norm.forward(xe), xe, grad_y)
    return grad_x


def _chunk_len(rows: int, graph: EdgeGraph, width: int, d: int) -> int:
    """Positions per chunk so that ``rows × n_writers × chunk × d <= CHUNK_ELEMENTS``."""
    return max(1, min(width, CHUNK_ELEMENTS // max(1, rows * graph.n_writers * d)))


# ----------------------------------------------------------------------------- gradient methods


class _Taps:
    """Forward hooks keeping what reader gradients need: residuals entering each norm (values)
    and the live q/k/v projection outputs, MLP inputs and final-norm output (for autograd)."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, weights: _Weights) -> None:
        self.model, self.arch, self.weights = model, arch, weights
        self.x_attn: dict[int, torch.Tensor] = {}
        self.x_mlp: dict[int, torch.Tensor] = {}
        self.x_out: torch.Tensor | None = None
        self.live: dict[tuple[str, int], torch.Tensor] = {}
        self._handles: list = []

    def __enter__(self) -> _Taps:
        w, add = self.weights, self._handles.append
        for layer in range(self.arch.n_layers):
            a = attention(self.model, layer)
            add(w.attn_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_attn.__setitem__(layer, args[0].detach())))
            add(w.mlp_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_mlp.__setitem__(layer, args[0].detach())))
            for name in ("q", "k", "v"):
                add(getattr(a, f"{name}_proj").register_forward_hook(
                    lambda m, args, out, key=(name, layer): self.live.__setitem__(key, out)))
            add(mlp(self.model, layer).register_forward_pre_hook(lambda m, args, layer=layer: self.live.__setitem__(("mlp", layer), args[0])))
        add(w.final_norm.register_forward_pre_hook(lambda m, args: setattr(self, "x_out", args[0].detach())))
        add(w.final_norm.register_forward_hook(lambda m, args, out: self.live.__setitem__(("out", 0), out)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _reader_grads(w: _Weights, taps: _Taps, grads: dict, layer: int, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
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

    def __init__(self, graph: EdgeGraph, weights: _Weights, pb: PairBatch) -> None:
        self.graph, self.weights, self.pb = graph, weights, pb
        rows, width = pb.window.shape
        d = weights.o[0].shape[0]
        self.step = _chunk_len(rows, graph, width, d)
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


def _gradient_pass(model, arch, graph: EdgeGraph, w: _Weights, pb: PairBatch, deltas: _Deltas, alpha: float | None) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- edge patching


class _EdgePatch:
    """Hooks giving each reader ``x_v - Σ_u P[v, u] (a_u - source_u)`` inside the window.

    The model runs ``k`` replicas of a batch of ``rows`` rows (row ``r·k + j`` is replica ``j``).
    ``patched``: ``[k, n_readers, n_writers]`` 0/1 (per replica: which edges are patched);
    ``source``: ``[rows, n_writers, T, d]`` replacement writer values (corrupted by default);
    ``window``: ``[rows, T]``. ``a_u`` is writer ``u``'s value in the current run, collected as
    the forward proceeds into ``delta`` ``[k, n_writers, rows, T, d]`` (replica-major), with
    the running sum over the writers seen so far in ``total`` ``[k, rows, T, d]``: a reader
    group with fewer kept than patched edges gets ``total - Σ_kept``, so the work scales with
    the smaller of the two edge sets (small circuits, single edges), and only writers with an
    edge in that set enter the product.
    """

    def __init__(self, model, arch, graph: EdgeGraph, w: _Weights, patched: torch.Tensor, source: torch.Tensor, window: torch.Tensor) -> None:
        self.model, self.arch, self.graph, self.w = model, arch, graph, w
        self.patched, self.source, self.window = patched, source, window
        self.k = patched.shape[0]
        self.win = window[:, None, :, None].to(source.dtype)
        self.delta = source.new_zeros((self.k, source.shape[1], *window.shape, source.shape[-1]))
        self.total = self.delta[:, 0].clone()
        self.x_attn: dict[int, torch.Tensor] = {}
        self.x_mlp: dict[int, torch.Tensor] = {}
        self._handles: list = []

    # writers (a cdelta.circuits.hooks handler)
    def __call__(self, site, act: torch.Tensor) -> torch.Tensor:
        layer, kind = site
        if site == EMBED_SITE:
            cols, value = slice(0, 1), act[:, None]
        elif kind == ATTN:
            start = self.graph.writer_head(layer, 0)
            cols, value = slice(start, start + self.graph.n_heads), torch.einsum("rthk,dhk->rhtd", act, self.w.o[layer])
        else:
            col = self.graph.writer_mlp(layer)
            cols, value = slice(col, col + 1), act[:, None]
        rows = self.window.shape[0]
        value = value.view(rows, self.k, *value.shape[1:]) - self.source[:, None, cols]
        self.delta[:, cols] = (value * self.win[:, None]).permute(1, 2, 0, 3, 4)
        self.total += self.delta[:, cols].sum(1)
        return act

    def _patched_inputs(self, x: torch.Tensor, readers: slice, n_up: int, norm) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Normed patched inputs ``[rows·k, R, T, d]`` and ``[rows·k, T, R]`` replace mask, or None if nothing is patched."""
        p = self.patched[:, readers, :n_up]
        if not bool(p.any()):
            return None
        k, _, rows, width, d = self.delta.shape
        shift = self.delta.new_empty((k, p.shape[1], rows * width * d))
        for j in range(k):
            patch_set = 2 * int(p[j].sum()) <= p[j].numel()
            edges = p[j] if patch_set else ~p[j]
            cols = edges.any(0).nonzero().flatten()
            part = edges[:, cols].to(self.delta.dtype) @ self.delta[j, cols].reshape(len(cols), rows * width * d)
            shift[j] = part if patch_set else self.total[j].reshape(1, -1) - part
        shift = shift.view(k, -1, rows, width, d).permute(2, 0, 1, 3, 4).reshape(rows * k, -1, width, d)
        mask = (self.window[:, None, :, None] & p.any(-1)[None, :, None, :]).reshape(rows * k, width, -1)
        return norm.forward(x[:, None] - shift), mask  # .forward: no hooks (ours record the norm's input)

    def _project(self, name: str, layer: int, out: torch.Tensor) -> torch.Tensor:
        g, h, kv = self.graph, self.graph.n_heads, self.graph.n_kv_heads
        start = g.attn_readers(layer).start + {"q": 0, "k": h, "v": h + kv}[name]
        n = h if name == "q" else kv
        got = self._patched_inputs(self.x_attn[layer], slice(start, start + n), g.attn_upstream(layer), self.w.attn_norm[layer])
        if got is None:
            return out
        y, mask = got
        weight, bias = getattr(self.w, name)[layer], getattr(self.w, f"{name}_bias")[layer]
        new = torch.einsum("rvtd,vkd->rtvk", y, weight)
        if bias is not None:
            new = new + bias
        heads = out.view(*out.shape[:2], n, -1)
        return torch.where(mask[..., None], new.to(out.dtype), heads).reshape(out.shape)

    def __enter__(self) -> _EdgePatch:
        add, g = self._handles.append, self.graph
        for layer in range(self.arch.n_layers):
            a = attention(self.model, layer)
            add(self.w.attn_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_attn.__setitem__(layer, args[0])))
            add(self.w.mlp_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_mlp.__setitem__(layer, args[0])))
            for name in ("q", "k", "v"):
                add(getattr(a, f"{name}_proj").register_forward_hook(
                    lambda m, args, out, name=name, layer=layer: self._project(name, layer, out)))

            def mlp_pre(m, args, layer=layer):
                r = g.reader_mlp(layer)
                got = self._patched_inputs(self.x_mlp[layer], slice(r, r + 1), g.mlp_upstream(layer), self.w.mlp_norm[layer])
                if got is None:
                    return None
                y, mask = got
                return (torch.where(mask, y[:, 0].to(args[0].dtype), args[0]),) + tuple(args[1:])

            add(mlp(self.model, layer).register_forward_pre_hook(mlp_pre))

        def final(m, args, out):
            got = self._patched_inputs(args[0], slice(g.output, g.output + 1), g.n_writers, m)
            return None if got is None else torch.where(got[1], got[0][:, 0].to(out.dtype), out)

        add(self.w.final_norm.register_forward_hook(final))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _run_patched(model, arch, graph: EdgeGraph, w: _Weights, pb: PairBatch, specs: list[torch.Tensor], source: torch.Tensor) -> torch.Tensor:
    """Per-example metric ``[k, n_examples]`` of one pass over ``k = len(specs)`` replicas of the
    batch (row ``r·k + j`` runs spec ``j``)."""
    rows, k = pb.window.shape[0], len(specs)
    valid = graph.valid()
    patched = torch.stack([(s & valid).T for s in specs]).to(source.device)
    cache = None
    if pb.prefix_cache is not None:
        cache = copy.deepcopy(pb.prefix_cache)
        cache.batch_repeat_interleave(k)
    patch = _EdgePatch(model, arch, graph, w, patched, source, pb.window)
    keep = min(pb.metric.logits_to_keep, pb.input_ids.shape[1])
    with patch:
        logits = run_with_handler(
            model, arch, pb.input_ids.repeat_interleave(k, 0), pb.attention_mask.repeat_interleave(k, 0), keep, patch,
            past_key_values=cache,
        )
    logits = logits.view(rows, k, *logits.shape[1:])
    return torch.stack([pb.metric(logits[:, j], pb.clean) for j in range(k)])


def _specs_per_pass(graph: EdgeGraph, pb: PairBatch, d: int, max_rows: int) -> int:
    """Replicas per pass: at most ``max_rows`` rows and ``CHUNK_ELEMENTS`` writer-difference elements."""
    rows, width = pb.window.shape
    return max(1, min(max_rows // rows, CHUNK_ELEMENTS // (rows * graph.n_writers * width * d)))


@torch.no_grad()
def patch_edges(
    model, arch, pb: PairBatch, specs: list[torch.Tensor], source: torch.Tensor | None = None, max_rows: int = 64,
    weights: _Weights | None = None,
) -> list[torch.Tensor]:
    """Per-example metric ``[n_examples]`` of the clean run with edge sets patched, one per spec.

    ``specs``: ``[n_writers, n_readers]`` bool masks of *patched* edges (non-edges ignored).
    ``source``: ``[rows, n_writers, T, d]`` writer values patched in (default: the aligned
    corrupted ones). Several specs share a pass by replicating rows (row ``r·k + j`` runs
    spec ``j``), up to ``max_rows`` rows and ``CHUNK_ELEMENTS`` writer-difference elements.
    """
    graph = EdgeGraph.of(arch)
    w = weights or _Weights.of(model, arch)
    if source is None:
        source = writer_acts(graph, w, pb.target)
    per_pass = _specs_per_pass(graph, pb, arch.d_model, max_rows)
    out: list[torch.Tensor] = []
    for start in range(0, len(specs), per_pass):
        out += list(_run_patched(model, arch, graph, w, pb, specs[start : start + per_pass], source))
    return out


# ----------------------------------------------------------------------------- attribution


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


def rank_edges(scores: torch.Tensor, valid: torch.Tensor, by: str = "abs") -> torch.Tensor:
    """Flat indices (``w · n_readers + r``) of all valid edges, best first (ties: writer-major order)."""
    if by not in ("abs", "signed"):
        raise CdeltaError(f"unknown ranking '{by}'", "use abs or signed")
    flat = scores.flatten()
    idx = valid.flatten().nonzero().flatten()
    key = flat[idx].abs() if by == "abs" else flat[idx]
    return idx[torch.sort(-key, stable=True).indices]


def count_passes(method: str, arch: Architecture, n_pairs: int, batch_size: int, steps: int) -> int:
    """Progress ticks of ``attribute_edges``: two per batch for the clean/corrupted runs, then one per pass (per edge for ``exact``)."""
    per_batch = {"eap": 1, "eap-ig": steps, "exact": EdgeGraph.of(arch).n_edges}[method]
    return -(-n_pairs // batch_size) * (2 + per_batch)


def _exact_scores(model, arch, graph: EdgeGraph, w: _Weights, pb: PairBatch, max_rows: int, on_pass: OnPass) -> torch.Tensor:
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
    _check_model(arch)
    graph = EdgeGraph.of(arch)
    metric_obj = get_metric(metric, tokenizer)
    total = torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.float64)
    n = len(clean)
    m_clean, m_corrupt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    start = time.perf_counter()
    with frozen(model):
        w = _Weights.of(model, arch)
        for idx, pb in iter_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions):
            if on_pass:
                on_pass()
                on_pass()
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
        size[comp] = sum(_slice_numel(params[n].shape, sl) for n, sl in component_param_slices(arch, comp, names))
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
    _check_model(arch)
    graph = EdgeGraph.of(arch)
    metric_obj = get_metric(metric, tokenizer)
    names = ["__empty__", *circuits]
    kept = {"__empty__": torch.zeros((graph.n_writers, graph.n_readers), dtype=torch.bool), **circuits}
    out = {name: torch.zeros(len(clean), dtype=torch.float64) for name in ["__clean__", "__corrupt__", *names]}
    with frozen(model):
        w = _Weights.of(model, arch)
        for idx, pb in iter_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions):
            if on_pass:
                on_pass()
                on_pass()
            out["__clean__"][idx] = pb.m_clean.double().cpu()
            out["__corrupt__"][idx] = pb.m_corrupt.double().cpu()
            specs = [~kept[name] for name in names]
            for name, m in zip(names, patch_edges(model, arch, pb, specs, max_rows=max_rows, weights=w)):
                out[name][idx] = m.double().cpu()
                if on_pass:
                    on_pass()
    return out


def edge_circuit_sizes(arch: Architecture, fractions=EDGE_FRACTIONS) -> list[int]:
    """Edge counts for each fraction of all edges: ``max(1, round(f · n_edges))``."""
    return faith_mod.circuit_sizes(EdgeGraph.of(arch).n_edges, fractions)


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
    sizes = edge_circuit_sizes(arch, fractions)
    seeds = [seed + i for i in range(n_random)]
    circuits: dict[str, torch.Tensor] = {}
    for k in sizes:
        circuits[f"attr:{k}"] = top_edges(scores, valid, k, by)
        for s in seeds:
            circuits[f"random:{k}:{s}"] = random_edges(valid, k, s * 1_000_003 + k)
        if shuffled_scores is not None:
            circuits[f"shuffled:{k}"] = top_edges(shuffled_scores, valid, k, by)
    values = evaluate_edge_circuits(
        model, tokenizer, clean, corrupt, circuits, metric=metric, batch_size=batch_size, n_positions=n_positions, on_pass=on_pass,
    )
    m_clean, m_empty = float(values["__clean__"].mean()), float(values["__empty__"].mean())
    gap = m_clean - m_empty
    per_pair = values["__clean__"] - values["__empty__"]
    gap_se = float(per_pair.std() / len(per_pair) ** 0.5) if len(per_pair) > 1 else float("nan")

    def rec(name: str) -> float:
        return (float(values[name].mean()) - m_empty) / gap if gap != 0 else float("nan")

    random_rec = [[rec(f"random:{k}:{s}") for s in seeds] for k in sizes]
    rand = torch.tensor(random_rec, dtype=torch.float64)
    result = {
        "unit": "edges",
        "ablation": ablation,
        "by": by,
        "n_pairs": len(clean),
        "n_edges": graph.n_edges,
        "n_nodes": arch.n_layers * (arch.n_heads + 1),
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
            "nodes": [implied_nodes(graph, circuits[f"attr:{k}"]) for k in sizes],
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
    return result
