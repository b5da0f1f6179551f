"""The graph a circuit lives on: nodes, edges, and the parameters each of them owns.

Nodes
-----
Attention heads ``L{l}.H{h}`` and MLP blocks ``L{l}.MLP`` (``cdelta.circuits.hooks``).
A node owns (what the edit stage may train), with ``hd = head_dim`` and
``g = h // (n_heads // n_kv_heads)`` the key/value head of head ``h``:

* head ``h`` of layer ``l``: rows ``[h*hd, (h+1)*hd)`` of ``q_proj.weight`` (and of
  ``q_proj.bias`` if present), rows ``[g*hd, (g+1)*hd)`` of ``k_proj``/``v_proj`` weight
  (and bias) — shared by the query heads of one GQA group and counted once per circuit —,
  and columns ``[h*hd, (h+1)*hd)`` of ``o_proj.weight``. An ``o_proj`` bias (if any)
  belongs to no head and is never included; neither are norms.
* MLP of layer ``l``: all of ``gate_proj``/``up_proj``/``down_proj`` (weights and biases
  if present); in fused (phi3) and mixture-of-experts families every tensor under ``.mlp.``
  (``gate_up_proj``; router and experts).

In phi3 q/k/v are row blocks of one ``qkv_proj``: the rows above are offset by
``Architecture.attn_offset`` (k rows start after the q rows, v rows after the k rows).

Edges
-----
In a pre-norm decoder (``Family.edges``) the residual stream entering any module is the
sum of everything written before it, so every module's input decomposes into per-writer
contributions. **Writers** ``u`` (``n_writers = 1 + n_layers·(n_heads + 1)``, forward order):

* ``input``: the token embeddings;
* ``L{l}.H{h}``: head ``h``'s contribution to the residual, ``z_h · W_O[:, h·hd:(h+1)·hd]ᵀ``
  (``z_h`` = its slice of ``o_proj``'s input; these families have no ``o_proj`` bias);
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
the MLP of layer ``l`` feeds readers of later layers and ``output``.

Edge components
---------------
An edge ``u → v`` owns the *write* weights of ``u`` and the *read* weights of ``v``
("components"): ``L{l}.H{h}.o`` (head ``h``'s columns of ``o_proj``), ``L{l}.MLP.out``
(``down_proj``), ``L{l}.H{h}.q`` (its rows of ``q_proj``, and bias), ``L{l}.KV{g}.k`` /
``.v`` (rows of ``k_proj``/``v_proj``, and bias), ``L{l}.MLP.in`` (``gate_proj`` and
``up_proj``); ``input`` and ``output`` own nothing (embeddings, final norm and LM head are
never edited). So a head whose only selected edges are q-edges contributes only its q rows.
The union of a head's components is exactly the node's parameter set.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from cdelta.circuits.hooks import parse_node_id
from cdelta.errors import CdeltaError
from cdelta.models.architecture import EDGE_MODEL_TYPES, Architecture

Slice = tuple[int, int, int]
"""``(dim, start, stop)`` of one parameter tensor."""


# ----------------------------------------------------------------------------- nodes


def node_param_slices(arch: Architecture, node: str, param_names: set[str]) -> list[tuple[str, Slice]]:
    """``[(param_name, (dim, start, stop))]`` owned by ``node`` (module docstring)."""
    layer, head = parse_node_id(node)
    if not 0 <= layer < arch.n_layers or (head is not None and not 0 <= head < arch.n_heads):
        raise CdeltaError(f"node {node} does not exist in this model ({arch.n_layers} layers, {arch.n_heads} heads)", "use a circuit made for this model")
    out: list[tuple[str, Slice]] = []
    hd = arch.head_dim
    if head is None and (arch.family.moe or arch.family.fused_gate_up):  # every tensor of the block, router and experts included
        return [(name, (0, 0, -1)) for name in arch.mlp_params(layer, param_names)]
    if head is None:
        for proj in ("gate", "up", "down"):
            for name in (arch.mlp_param(layer, proj), arch.mlp_bias_param(layer, proj)):
                if name in param_names:
                    out.append((name, (0, 0, -1)))
        return out
    g = arch.kv_head(head)
    for proj, index in (("q", head), ("k", g), ("v", g)):
        rows = (arch.attn_offset(proj) + index * hd, arch.attn_offset(proj) + (index + 1) * hd)
        out.append((arch.attn_param(layer, proj), (0, *rows)))
        if arch.attn_bias_param(layer, proj) in param_names:
            out.append((arch.attn_bias_param(layer, proj), (0, *rows)))
    out.append((arch.attn_param(layer, "o"), (1, head * hd, (head + 1) * hd)))
    return out


def total_params(model: torch.nn.Module) -> int:
    """All parameters, tied tensors (e.g. embeddings/LM head) counted once."""
    return sum(p.numel() for p in model.parameters())


def slice_numel(shape: torch.Size, sl: Slice) -> int:
    dim, start, stop = sl
    stop = shape[dim] if stop == -1 else stop
    return (stop - start) * (math.prod(shape) // shape[dim])


# ----------------------------------------------------------------------------- edges


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


def check_edge_model(arch: Architecture) -> None:
    """Raise ``CdeltaError`` unless the family has plain pre-norm layers (``Family.edges``)."""
    if not arch.family.edges:
        raise CdeltaError(
            f"edge attribution supports plain pre-norm layers ({', '.join(EDGE_MODEL_TYPES)}), not '{arch.model_type}' "
            f"({arch.family.no_edges})",
            "use node-level localization (without --edges) for this model",
        )


_COMPONENT = re.compile(r"L(\d+)\.(?:H(\d+)\.([qo])|KV(\d+)\.([kv])|MLP\.(in|out))")


def component_param_slices(arch: Architecture, component: str, param_names: set[str]) -> list[tuple[str, Slice]]:
    """``[(param_name, (dim, start, stop))]`` owned by one edge component (module docstring)."""
    m = _COMPONENT.fullmatch(component)
    bad = CdeltaError(f"bad or foreign edge component '{component}'", "use a circuit made for this model")
    if m is None or int(m.group(1)) >= arch.n_layers:
        raise bad
    layer, hd = int(m.group(1)), arch.head_dim
    if m.group(6) and (arch.family.moe or arch.family.fused_gate_up):  # in: router + expert gate/up; out: expert down
        owned = arch.mlp_params(layer, param_names)
        return [(n, (0, 0, -1)) for n in owned if ("down_proj" in n) == (m.group(6) == "out")]
    if m.group(6):
        projs = ("gate", "up") if m.group(6) == "in" else ("down",)
        names = [arch.mlp_param(layer, p) for p in projs] + [arch.mlp_bias_param(layer, p) for p in projs]
        return [(n, (0, 0, -1)) for n in names if n in param_names]
    head, proj = (int(m.group(2)), m.group(3)) if m.group(2) else (int(m.group(4)), m.group(5))
    if head >= (arch.n_heads if proj in ("q", "o") else arch.n_kv_heads):
        raise bad
    rows = (arch.attn_offset(proj) + head * hd, arch.attn_offset(proj) + (head + 1) * hd)
    if proj == "o":
        return [(arch.attn_param(layer, "o"), (1, *rows))]
    bias = arch.attn_bias_param(layer, proj)
    return [(arch.attn_param(layer, proj), (0, *rows))] + ([(bias, (0, *rows))] if bias in param_names else [])


def rank_edges(scores: torch.Tensor, valid: torch.Tensor, by: str = "abs") -> torch.Tensor:
    """Flat indices (``w · n_readers + r``) of all valid edges, best first (ties: writer-major order)."""
    if by not in ("abs", "signed"):
        raise CdeltaError(f"unknown ranking '{by}'", "use abs or signed")
    flat = scores.flatten()
    idx = valid.flatten().nonzero().flatten()
    key = flat[idx].abs() if by == "abs" else flat[idx]
    return idx[torch.sort(-key, stable=True).indices]
