"""Edge activation patching: the clean run with chosen writer → reader edges replaced.

For edge sets ``P`` (one per replica of a batch), reader ``v`` gets
``x_v - Σ_{u: (u, v) ∈ P} (a_u - source_u)`` inside the aligned window, with ``a_u`` the
writer's value in the same run and ``source_u`` its corrupted value by default (graph
and notation: ``cdelta.circuits.graph``). Patching every edge out of a node equals
patching the node; patching every edge gives the corrupted metric.

Compute and memory: writer differences are ``rows × n_writers × positions × d``; several
edge sets share a pass by replicating rows up to ``CHUNK_ELEMENTS`` writer-difference
elements, and each reader group's shift costs ``min(#patched, #kept edges) ×
rows·positions·d``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from cdelta.circuits.attribution import PairBatch, frozen, iter_pair_batches
from cdelta.circuits.graph import EdgeGraph
from cdelta.circuits.hooks import ATTN, EMBED_SITE, MLP, run_with_handler
from cdelta.models.architecture import Architecture, attn_norm, attn_proj, final_norm, mlp, mlp_norm

CHUNK_ELEMENTS = 2**25
"""Largest writer-difference tensor (elements) held at once: 128 MB in float32."""


@dataclass
class EdgeWeights:
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
    def of(cls, model: torch.nn.Module, arch: Architecture) -> EdgeWeights:
        h, kv, hd, d = arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.d_model
        layers = range(arch.n_layers)
        heads = {"q": h, "k": kv, "v": kv}

        def proj(name: str) -> list[torch.nn.Linear]:
            return [attn_proj(model, layer, name) for layer in layers]

        def bias(module, n):
            return None if module.bias is None else module.bias.detach().view(n, hd)

        per_head = {name: [m.weight.detach().view(n, hd, d) for m in proj(name)] for name, n in heads.items()}
        biases = {f"{name}_bias": [bias(m, n) for m in proj(name)] for name, n in heads.items()}
        return cls(
            **per_head,
            **biases,
            o=[m.weight.detach().view(d, h, hd) for m in proj("o")],
            attn_norm=[attn_norm(model, layer) for layer in layers],
            mlp_norm=[mlp_norm(model, layer) for layer in layers],
            final_norm=final_norm(model),
        )


def writer_acts(graph: EdgeGraph, weights: EdgeWeights, acts: dict, t0: int = 0, t1: int | None = None) -> torch.Tensor:
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


def chunk_len(rows: int, graph: EdgeGraph, width: int, d: int) -> int:
    """Positions per chunk so that ``rows × n_writers × chunk × d <= CHUNK_ELEMENTS``."""
    return max(1, min(width, CHUNK_ELEMENTS // max(1, rows * graph.n_writers * d)))


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

    def __init__(self, model, arch, graph: EdgeGraph, w: EdgeWeights, patched: torch.Tensor, source: torch.Tensor, window: torch.Tensor) -> None:
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
            add(self.w.attn_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_attn.__setitem__(layer, args[0])))
            add(self.w.mlp_norm[layer].register_forward_pre_hook(lambda m, args, layer=layer: self.x_mlp.__setitem__(layer, args[0])))
            for name in ("q", "k", "v"):
                add(attn_proj(self.model, layer, name).register_forward_hook(
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


def _run_patched(model, arch, graph: EdgeGraph, w: EdgeWeights, pb: PairBatch, specs: list[torch.Tensor], source: torch.Tensor) -> torch.Tensor:
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
    weights: EdgeWeights | None = None,
) -> list[torch.Tensor]:
    """Per-example metric ``[n_examples]`` of the clean run with edge sets patched, one per spec.

    ``specs``: ``[n_writers, n_readers]`` bool masks of *patched* edges (non-edges ignored).
    ``source``: ``[rows, n_writers, T, d]`` writer values patched in (default: the aligned
    corrupted ones). Several specs share a pass by replicating rows (row ``r·k + j`` runs
    spec ``j``), up to ``max_rows`` rows and ``CHUNK_ELEMENTS`` writer-difference elements.
    """
    graph = EdgeGraph.of(arch)
    w = weights or EdgeWeights.of(model, arch)
    if source is None:
        source = writer_acts(graph, w, pb.target)
    per_pass = _specs_per_pass(graph, pb, arch.d_model, max_rows)
    out: list[torch.Tensor] = []
    for start in range(0, len(specs), per_pass):
        out += list(_run_patched(model, arch, graph, w, pb, specs[start : start + per_pass], source))
    return out


def edge_pair_batches(model: torch.nn.Module, arch: Architecture, tokenizer, metric, clean: list[str], corrupt: list[str],
                      batch_size: int, n_positions: int | str | None,
                      on_pass: Callable[[], None] | None = None) -> Iterator[tuple[EdgeWeights, list[int], PairBatch]]:
    """The clean/corrupted pair batches of an edge computation, with the model frozen:
    yields ``(weights, original indices, batch)``; ``on_pass`` is called twice per batch
    (its clean and corrupted forward passes)."""
    with frozen(model):
        weights = EdgeWeights.of(model, arch)
        for idx, pb in iter_pair_batches(model, arch, tokenizer, metric, clean, corrupt, batch_size, n_positions):
            if on_pass:
                on_pass()
                on_pass()
            yield weights, idx, pb
