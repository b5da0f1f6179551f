"""The ``Circuit``: node scores, a selection of nodes, and the parameter slices they own.

Which parameters a node (or an edge component) owns is defined in
``cdelta.circuits.graph``: a head its q rows, its GQA group's k/v rows and its o columns,
an MLP all three matrices; norms, embeddings and the LM head never.

An *edge* circuit (``cdelta.circuits.edges.edge_circuit``) carries ``meta["edges"]``; its
parameters are the finer components its edges touch (``meta["edges"]["components"]``, e.g.
only ``L3.H2.q`` = head 2's q rows), not whole nodes. Re-selecting nodes (``select``,
``with_nodes``) turns it back into a node circuit and drops ``meta["edges"]``.

Selection ranks nodes by ``|score|`` by default (a node that strongly *suppresses*
refusal is as much part of the mechanism as one that promotes it); ``by="signed"``
ranks by the signed score (refusal-promoting first).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta import __version__
from cdelta.circuits.graph import Slice, component_param_slices, node_param_slices, slice_numel, total_params
from cdelta.circuits.hooks import parse_node_id
from cdelta.errors import CdeltaError
from cdelta.io import atomic_write_json
from cdelta.models.architecture import Architecture, architecture_of

FORMAT = "cdelta-circuit"
FORMAT_VERSION = 1
SELECTION_KINDS = ("top_k", "top_frac", "threshold", "params")


def parse_selection(spec: str) -> dict:
    """``"top_k:10" | "top_frac:0.05" | "threshold:0.1" | "params:0.02"`` → selection dict.

    ``params:f`` is a parameter budget: a fraction ``f`` of all model parameters.
    """
    kind, _, value = spec.partition(":")
    if kind not in SELECTION_KINDS or not value:
        raise CdeltaError(f"bad circuit selection '{spec}'", "use top_k:N, top_frac:F, threshold:S or params:F (fraction of parameters)")
    try:
        number = int(value) if kind == "top_k" else float(value)
    except ValueError:
        raise CdeltaError(f"bad number in circuit selection '{spec}'", "e.g. top_k:10 or params:0.02") from None
    return {"kind": kind, "value": number}


@dataclass
class Circuit:
    """Scores of every node plus the selected nodes (ranked), with provenance in ``meta``.

    ``meta`` holds model, weights_sha256, category, contrast, method, steps, metric, seed,
    n_pairs, n_positions, selection and cdelta_version (see ``to_dict``).
    """

    n_layers: int
    n_heads: int
    scores: dict[str, float]
    nodes: list[str]
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, node: str) -> bool:
        return node in set(self.nodes)

    @property
    def n_nodes_total(self) -> int:
        return len(self.scores)

    def heads(self) -> list[str]:
        return [n for n in self.nodes if not n.endswith(".MLP")]

    def mlps(self) -> list[str]:
        return [n for n in self.nodes if n.endswith(".MLP")]

    def score_matrix(self) -> torch.Tensor:
        """``[n_layers, n_heads + 1]`` scores (last column = MLP)."""
        out = torch.zeros((self.n_layers, self.n_heads + 1), dtype=torch.float64)
        for node, s in self.scores.items():
            layer, head = parse_node_id(node)
            out[layer, self.n_heads if head is None else head] = s
        return out

    def mask_matrix(self) -> torch.Tensor:
        """``[n_layers, n_heads + 1]`` bool: selected nodes."""
        out = torch.zeros((self.n_layers, self.n_heads + 1), dtype=torch.bool)
        for node in self.nodes:
            layer, head = parse_node_id(node)
            out[layer, self.n_heads if head is None else head] = True
        return out

    def ranked(self, by: str = "abs") -> list[str]:
        """All node ids, most important first (``abs``: by |score|; ``signed``: by score)."""
        if by not in ("abs", "signed"):
            raise CdeltaError(f"unknown ranking '{by}'", "use abs or signed")
        key = (lambda n: -abs(self.scores[n])) if by == "abs" else (lambda n: -self.scores[n])
        return sorted(self.scores, key=lambda n: (key(n), self._canonical(n)))

    def _canonical(self, node: str) -> tuple[int, int]:
        """Tie-break order: layer, then heads, then the MLP."""
        layer, head = parse_node_id(node)
        return layer, self.n_heads if head is None else head

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_scores(cls, arch: Architecture, scores: dict[str, float], **meta) -> Circuit:
        """A circuit with all scores and nothing selected yet (call ``select``)."""
        meta.setdefault("cdelta_version", __version__)
        meta.setdefault(
            "architecture",
            {k: getattr(arch, k) for k in ("model_type", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_model", "d_mlp")},
        )
        return cls(arch.n_layers, arch.n_heads, dict(scores), [], meta)

    def select(
        self,
        *,
        top_k: int | None = None,
        top_frac: float | None = None,
        threshold: float | None = None,
        param_budget: float | None = None,
        model: torch.nn.Module | None = None,
        by: str = "abs",
    ) -> Circuit:
        """A copy with nodes selected by exactly one criterion.

        ``top_k`` nodes; ``top_frac`` of all nodes (at least one); every node whose
        ranking key (``|score|`` or score) is ``>= threshold``; or ``param_budget``: walk
        the ranking and add every node whose parameters still fit into that fraction of
        the model's parameters (nodes that do not fit are skipped, smaller later ones may
        still be added; needs ``model``).
        """
        given = {k: v for k, v in dict(top_k=top_k, top_frac=top_frac, threshold=threshold, params=param_budget).items() if v is not None}
        if len(given) != 1:
            raise CdeltaError("select needs exactly one of top_k, top_frac, threshold, param_budget", "pass one selection criterion")
        kind, value = next(iter(given.items()))
        ranked = self.ranked(by)
        if kind == "top_k":
            chosen = ranked[: max(0, int(value))]
        elif kind == "top_frac":
            chosen = ranked[: max(1, round(float(value) * len(ranked)))]
        elif kind == "threshold":
            key = (lambda n: abs(self.scores[n])) if by == "abs" else (lambda n: self.scores[n])
            chosen = [n for n in ranked if key(n) >= value]
        else:
            if model is None:
                raise CdeltaError("a parameter-budget selection needs the model", "pass model=...")
            chosen = self._budget_select(model, ranked, float(value))
        meta = dict(self._node_meta(), selection={"kind": kind, "value": value, "by": by})
        out = Circuit(self.n_layers, self.n_heads, self.scores, chosen, meta)
        if model is not None:
            out.meta.update(n_params=out.n_params(model), param_fraction=out.fraction(model))
        return out

    def with_nodes(self, nodes: list[str], selection: dict | None = None) -> Circuit:
        """A copy with an explicit node list."""
        unknown = [n for n in nodes if n not in self.scores]
        if unknown:
            raise CdeltaError(f"unknown nodes {unknown[:3]}", "use ids like L12.H3 or L12.MLP")
        return Circuit(self.n_layers, self.n_heads, self.scores, list(nodes), dict(self._node_meta(), selection=selection or {"kind": "explicit"}))

    def _node_meta(self) -> dict:
        """``meta`` without the edge selection (for node-level re-selections)."""
        return {k: v for k, v in self.meta.items() if k != "edges"}

    def select_spec(self, spec: str | dict, model: torch.nn.Module | None = None, by: str = "abs") -> Circuit:
        """``select`` from a spec string (``parse_selection``) or dict."""
        sel = parse_selection(spec) if isinstance(spec, str) else spec
        key = {"top_k": "top_k", "top_frac": "top_frac", "threshold": "threshold", "params": "param_budget"}[sel["kind"]]
        return self.select(**{key: sel["value"]}, model=model, by=sel.get("by", by))

    def _budget_select(self, model, ranked: list[str], budget: float) -> list[str]:
        arch = self._arch(model)
        params = dict(model.named_parameters())
        names = set(params)
        limit = budget * total_params(model)
        used: set[tuple[str, Slice]] = set()
        count, chosen = 0, []
        for node in ranked:
            new = [s for s in node_param_slices(arch, node, names) if s not in used]
            extra = sum(slice_numel(params[name].shape, sl) for name, sl in new)
            if count + extra <= limit:
                chosen.append(node)
                used.update(new)
                count += extra
        return chosen

    # ------------------------------------------------------------------ parameters
    def _arch(self, model) -> Architecture:
        arch = architecture_of(model)
        if (arch.n_layers, arch.n_heads) != (self.n_layers, self.n_heads):
            raise CdeltaError(
                f"circuit is for {self.n_layers} layers x {self.n_heads} heads but the model has {arch.n_layers} x {arch.n_heads}",
                "use the circuit with the model it was localized on",
            )
        return arch

    def param_slices(self, model: torch.nn.Module) -> dict[str, list[Slice]]:
        """``{param_name: [(dim, start, stop)]}`` owned by the selected nodes, deduplicated and sorted.

        ``stop`` is resolved to the real size (no ``-1``). Shared GQA key/value rows appear once.
        """
        arch = self._arch(model)
        params = dict(model.named_parameters())
        names = set(params)
        out: dict[str, set[Slice]] = {}
        for name, (dim, start, stop) in self._owned_slices(arch, names):
            if name not in params:
                raise CdeltaError(f"parameter {name} not found in the model", "check the architecture naming in cdelta.models.architecture")
            stop = params[name].shape[dim] if stop == -1 else stop
            out.setdefault(name, set()).add((dim, start, stop))
        return {name: sorted(slices) for name, slices in sorted(out.items())}

    def _owned_slices(self, arch: Architecture, names: set[str]) -> list[tuple[str, Slice]]:
        """``[(param_name, slice)]`` of the nodes, or of an edge circuit's components (may repeat)."""
        components = self.meta.get("edges", {}).get("components")
        if components is None:
            return [s for node in self.nodes for s in node_param_slices(arch, node, names)]
        return [s for c in components for s in component_param_slices(arch, c, names)]

    def param_masks(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``{param_name: bool tensor shaped like the parameter}``, True where the circuit owns the entry."""
        params = dict(model.named_parameters())
        masks = {}
        for name, slices in self.param_slices(model).items():
            mask = torch.zeros(params[name].shape, dtype=torch.bool)
            for dim, start, stop in slices:
                mask.narrow(dim, start, stop - start).fill_(True)
            masks[name] = mask
        return masks

    def n_params(self, model: torch.nn.Module) -> int:
        """Number of parameter entries the circuit owns (shared k/v rows once)."""
        return int(sum(int(m.sum()) for m in self.param_masks(model).values()))

    def fraction(self, model: torch.nn.Module) -> float:
        """``n_params`` over all model parameters (tied embeddings counted once)."""
        return self.n_params(model) / total_params(model)

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            **self.meta,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "nodes": list(self.nodes),
            "scores": dict(self.scores),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Circuit:
        """A circuit from its stored dict; ``CdeltaError`` if the dict is not one ``to_dict`` writes."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CdeltaError("not a cdelta circuit file", "pass a circuit.json written by `cdelta localize`")
        version = data.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise CdeltaError(f"circuit file: format_version {str(version)[:20]!r} is not a number", "re-run `cdelta localize`")
        if version > FORMAT_VERSION:
            raise CdeltaError(f"circuit format version {data['format_version']} is newer than this cdelta supports", "upgrade cdelta")
        meta = {k: v for k, v in data.items() if k not in ("format", "format_version", "n_layers", "n_heads", "nodes", "scores")}
        n_layers, n_heads, scores, nodes = (data.get(k) for k in ("n_layers", "n_heads", "scores", "nodes"))
        fix = "re-run `cdelta localize` (the circuit file is damaged or hand-edited)"
        count = lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0  # noqa: E731
        number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        if not (count(n_layers) and count(n_heads)):
            raise CdeltaError("circuit file: n_layers and n_heads must be positive integers", fix)
        if not (isinstance(scores, dict) and all(number(v) for v in scores.values())):
            raise CdeltaError("circuit file: scores must map node ids to numbers", fix)
        if not (isinstance(nodes, list) and all(isinstance(n, str) for n in nodes)):
            raise CdeltaError("circuit file: nodes must be a list of node ids", fix)
        for node in [*scores, *nodes]:
            try:
                layer, head = parse_node_id(node)
            except ValueError:
                raise CdeltaError(f"circuit file: {node[:40]!r} is not a node id (L<layer>.H<head> or L<layer>.MLP)", fix) from None
            if not (0 <= layer < n_layers and (head is None or 0 <= head < n_heads)):
                raise CdeltaError(f"circuit file: node {node} lies outside {n_layers} layers of {n_heads} heads", fix)
        return cls(n_layers, n_heads, {k: float(v) for k, v in scores.items()}, list(nodes), meta)

    def to_json(self, path: str | Path) -> Path:
        """Write atomically (temp file in the same directory, then rename)."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Circuit:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CdeltaError(f"circuit file {path} does not exist", "run `cdelta localize` first or check the path") from None
        except json.JSONDecodeError as exc:
            raise CdeltaError(f"circuit file {path} is not valid JSON ({exc.msg})", "re-run `cdelta localize`") from None
        except UnicodeDecodeError:
            raise CdeltaError(f"circuit file {path} is not UTF-8 JSON text", "re-run `cdelta localize`") from None
        except OSError as exc:
            raise CdeltaError(f"cannot read circuit file {path}: {exc.strerror or exc}", "check the path") from None
        return cls.from_dict(data)


def random_circuit_like(circuit, seed: int):
    """A circuit with as many heads and MLPs as ``circuit``, drawn uniformly at random."""
    rng = random.Random(seed)
    nodes = list(circuit.scores)
    heads = [n for n in nodes if not n.endswith("MLP")]
    mlps = [n for n in nodes if n.endswith("MLP")]
    chosen = rng.sample(heads, len(circuit.heads())) + rng.sample(mlps, len(circuit.mlps()))
    return circuit.with_nodes(chosen, {"kind": "random", "seed": seed, "like": circuit.meta.get("selection")})
