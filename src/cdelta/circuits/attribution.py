"""Node attribution: EAP, EAP-IG and exact activation patching, in plain PyTorch.

Setting
-------
Each example is a pair (clean ``i``, corrupted ``i``): clean = a prompt of the target
harm category, corrupted = a contrast prompt (another harm category, or harmless).
``m`` is a refusal metric (``cdelta.circuits.metric``), one value per example.

Nodes are attention heads (their slice of ``o_proj``'s input) and MLP blocks (their
output); see ``cdelta.circuits.hooks``. Every score is::

    score(node) = mean over examples of  sum over aligned positions and the node's dims of
                  (a_clean - a_corrupt) * g

where ``g`` is a gradient of ``m`` with respect to the node's output (which gradient is
what distinguishes the methods). It estimates the *total effect* of the node,
``m(clean) - m(clean with only this node patched to its corrupted value)``:
**positive = the node supports refusal on the clean prompts relative to the
corrupted ones.** ``exact`` measures that quantity directly.

Position alignment
------------------
Clean and corrupted prompts have different lengths. Inputs are left-padded, so position
-1 is the last prompt token in both runs, and positions are aligned *from the end*.
Activations are patched / interpolated only inside a per-pair window of the last ``w``
positions; outside it every node keeps its clean value. ``n_positions`` chooses ``w``:

* ``"suffix"`` (default): the chat template's closing tokens after the user message
  (``<|im_end|>\n<|im_start|>assistant\n``: 6 tokens for SmolLM2), plus the appended
  reply tokens for the teacher-forced metric. These tokens are *identical* in both runs,
  so a patch swaps context, never token identity, and the only way information about
  the prompt reaches the window is through attention heads reading the (clean) earlier
  positions. It is also cheap (see the prefix cache below).
* ``"all"`` / ``None``: ``w = min(len_clean, len_corrupt) - P``, where ``P`` is the
  template's shared prefix (system prompt + ``<|im_start|>user\n``; identical tokens, so
  nothing is lost, and we avoid aligning the first-token attention sink of the shorter
  prompt with a content token of the longer one). Content positions then hold
  different tokens in the two runs (token embeddings are never patched).
* an int ``k``: the last ``min(k, "all")`` positions.

Because the window always contains the read-out positions and *all* nodes are patched
there, patching every node reproduces the corrupted run's final residual stream at the
read-out positions exactly (the template's closing tokens are the same), so
``m(all nodes patched) = m(corrupted)``.

Methods
-------
``eap``
    Attribution patching (Syed et al. 2023; Nanda's AtP): one gradient evaluated on the
    clean run, ``score = (a_clean - a_corrupt) · ∂m/∂a |clean``. The usual convention
    multiplies ``(a_corrupt - a_clean)`` to estimate ``m(patched) - m(clean)``; we flip
    the sign so that positive = supports refusal.
``eap-ig`` (default)
    Integrated gradients over *node activations*, all nodes jointly. At step ``k`` every
    node's output (inside the window) is set to ``a_corr + α_k (a_clean - a_corr)`` with
    midpoint alphas ``α_k = (k + 0.5) / steps``; gradients pass straight through each
    replaced node to its natural computation, so ``∂m/∂a`` is the total derivative
    (through all downstream nodes), evaluated along the straight path between the two
    runs' node states. Both end points are exact (α=0: corrupted, α=1: clean). Cost:
    ``steps`` forward+backward passes. We use this instead of interpolating input
    embeddings (Hanna et al. 2024, "EAP-IG-inputs") because input interpolation needs
    equal-length prompts; that variant is available as ``eap-ig-inputs``.
``eap-ig-inputs``
    IG with the token embeddings interpolated inside the window (everything else computed
    naturally); exact end points only when the pair has equal length.
``eap-ig-layer``
    IG over one layer-cut at a time (all heads of one layer, or one MLP), everything else
    computed naturally ("EAP-IG-activations"; Marks et al. 2024). Completeness holds per
    cut: the cut's scores sum to ``m(clean) - m(cut patched)`` up to the Riemann error.
    Cost: ``2 · n_layers · steps`` passes: accurate but slow.
``exact``
    Activation patching: for every node, one forward pass of the clean prompt with that
    node's window activations replaced by the corrupted ones;
    ``score = m(clean) - m(patched)``. Ground truth for single-node effects; ``n_nodes``
    runs (batched several per pass by replicating rows).

Note: single-node patching measures a node's effect while every other node stays clean;
with redundant nodes these effects are small and sum to much less than the total
difference. Joint EAP-IG instead apportions the whole clean-vs-corrupted difference along
a path on which all nodes move, so it need not rank nodes like single-node patching when
nodes interact (how the methods compared on a real model: docs/localize.md, "Nodes").

Compute
-------
Positions before the window are identical in every run, so their keys/values are
computed once per batch (a prefix KV cache) and all interventions only run the last
``max window`` positions. Parameters are frozen during attribution (no weight gradients);
gradients are taken with ``torch.autograd.grad`` on the hooked node tensors.

Memory: node activations are only ever held for the window positions of one batch
(the corrupted run also goes through a prefix cache), IG steps run one after another,
and ``max_memory_mb`` caps the pairs per batch by the estimate ``batch_memory_bytes``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from cdelta.circuits.hooks import (
    ATTN,
    EMBED_SITE,
    MLP,
    Recorder,
    Site,
    node_ids,
    node_sites,
    replace_where,
    run_with_handler,
)
from cdelta.circuits.metric import Encoded, Metric, get_metric
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of
from cdelta.models.chat import format_chat

METHODS = ("eap", "eap-ig", "eap-ig-inputs", "eap-ig-layer", "exact")

OnPass = Callable[[], None] | None


# ----------------------------------------------------------------------------- helpers


@contextmanager
def frozen(model: torch.nn.Module):
    """Temporarily set ``requires_grad=False`` on all parameters (no weight gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def template_prefix_len(tokenizer) -> int:
    """Number of leading tokens the chat template puts before every user message."""
    return _template_affixes(tokenizer)[0]


def template_suffix_len(tokenizer) -> int:
    """Number of trailing tokens the chat template puts after every user message (up to the reply)."""
    return _template_affixes(tokenizer)[1]


_AFFIXES: dict[int, tuple[object, tuple[int, int]]] = {}


def _template_affixes(tokenizer) -> tuple[int, int]:
    key = id(tokenizer)
    if key in _AFFIXES and _AFFIXES[key][0] is tokenizer:
        return _AFFIXES[key][1]
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in format_chat(tokenizer, ["Hello there, friend.", "7 + 3 = ?"]))
    pre = 0
    while pre < min(len(a), len(b)) and a[pre] == b[pre]:
        pre += 1
    suf = 0
    while suf < min(len(a), len(b)) - pre and a[len(a) - 1 - suf] == b[len(b) - 1 - suf]:
        suf += 1
    _AFFIXES[key] = (tokenizer, (pre, suf))
    return pre, suf


def align_to_clean(clean: torch.Tensor, corrupt: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Corrupted activations placed in the clean layout, aligned from the end.

    ``clean``: ``[rows, S_clean, ...]``, ``corrupt``: ``[rows, S_corrupt, ...]``,
    ``window``: ``[rows, S_clean]`` (a suffix of each row). Returns the clean tensor with
    the window positions replaced by the corrupted activations at the same distance from
    the end.
    """
    s_c, s_k = clean.shape[1], corrupt.shape[1]
    m = min(s_c, s_k)
    out = clean.clone()
    out[:, s_c - m :] = replace_where(clean[:, s_c - m :], window[:, s_c - m :].to(clean.device), corrupt[:, s_k - m :])
    return out


@dataclass
class PairBatch:
    """One batch of clean/corrupted pairs with cached activations.

    Positions before the window are never intervened on, so they are identical in every
    run: their keys/values are computed once (``prefix_cache``, positions ``[0, S - T)``)
    and every later run processes only the last ``T = max window`` positions
    (``input_ids``: ``[rows, T]``; ``attention_mask`` covers all ``S`` positions). This is
    exact and saves most of the system prompt's compute.

    ``window``: ``[rows, T]`` bool, the aligned positions. ``clean_acts[site]`` are the
    clean activations on those ``T`` positions; ``target[site]`` the corrupted ones aligned
    into the clean layout (equal to clean outside the window). ``m_clean``/``m_corrupt``:
    ``[n_examples]`` from the unmodified clean and corrupted runs.
    """

    clean: Encoded
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prefix_cache: object
    window: torch.Tensor
    clean_acts: dict[Site, torch.Tensor]
    target: dict[Site, torch.Tensor]
    m_clean: torch.Tensor
    m_corrupt: torch.Tensor
    metric: Metric

    @property
    def n_examples(self) -> int:
        return self.clean.n_examples

    def forward(self, model, arch, handler, grad_root: bool = False) -> torch.Tensor:
        """Run the clean inputs with ``handler``; returns per-example metric ``[n_examples]``."""
        keep = min(self.metric.logits_to_keep, self.input_ids.shape[1])
        logits = run_with_handler(
            model, arch, self.input_ids, self.attention_mask, keep, handler, grad_root, self.prefix_cache
        )
        return self.metric(logits, self.clean)

    def to_examples(self, per_row: torch.Tensor) -> torch.Tensor:
        """Sum a ``[rows, ...]`` tensor over the rows of each example → ``[n_examples, ...]``."""
        out = torch.zeros((self.n_examples, *per_row.shape[1:]), dtype=per_row.dtype, device=per_row.device)
        return out.index_add_(0, self.clean.row_example.to(per_row.device), per_row)


POSITION_MODES = ("all", "suffix")


def check_positions(n_positions: int | str | None) -> int | str | None:
    """Validate ``n_positions``: None/"all", "suffix" or a positive int."""
    if n_positions is None or n_positions in POSITION_MODES:
        return n_positions
    if isinstance(n_positions, int) and not isinstance(n_positions, bool) and n_positions >= 1:
        return n_positions
    raise CdeltaError(f"bad n_positions {n_positions!r}", "use 'all', 'suffix' or a positive number of last positions")


def windows(clean: Encoded, corrupt: Encoded, prefix_len: int, suffix_len: int, n_positions: int | str | None) -> torch.Tensor:
    """``[rows, S_clean]`` bool: the last ``w_r`` positions of each clean row (see module docstring).

    ``None``/``"all"``: ``w = min(len_clean, len_corrupt) - prefix_len``; ``"suffix"``: the
    template's closing tokens plus any appended reply tokens (identical tokens in both
    runs); ``k``: ``min(k, all)``.
    """
    n_positions = check_positions(n_positions)
    shortest = torch.minimum(clean.lengths, corrupt.lengths)
    width = (shortest - prefix_len).clamp(min=1)
    if n_positions == "suffix":
        extra = torch.tensor([len(s) for s in clean.suffix_ids], device=width.device)
        width = torch.minimum(width, suffix_len + extra)
    elif isinstance(n_positions, int):
        width = width.clamp(max=n_positions)
    width = torch.minimum(width, shortest)
    seq = clean.input_ids.shape[1]
    pos = torch.arange(seq, device=clean.input_ids.device)
    return pos[None, :] >= (seq - width)[:, None]


@torch.no_grad()
def prepare_pair_batch(
    model: torch.nn.Module,
    arch: Architecture,
    tokenizer,
    metric: Metric,
    clean_texts: list[str],
    corrupt_texts: list[str],
    n_positions: int | str | None = "suffix",
) -> PairBatch:
    """Encode one batch of pairs, run clean and corrupted once, cache and align activations."""
    device = next(model.parameters()).device
    clean = metric.encode(tokenizer, clean_texts).to(device)
    corrupt = metric.encode(tokenizer, corrupt_texts).to(device)
    full_window = windows(clean, corrupt, template_prefix_len(tokenizer), template_suffix_len(tokenizer), n_positions)
    seq = clean.input_ids.shape[1]
    span = max(int(full_window.sum(1).max()), min(metric.logits_to_keep, seq))
    cut = seq - span
    cache = _prefix_cache(model, clean, cut)
    window = full_window[:, cut:]
    rec_c, rec_k = Recorder(), Recorder()
    keep = min(metric.logits_to_keep, span)
    logits = run_with_handler(model, arch, clean.input_ids[:, cut:], clean.attention_mask, keep, rec_c, past_key_values=cache)
    m_clean = metric(logits, clean)
    # the corrupted run is recorded on its last positions only (what align_to_clean reads)
    seq_k = corrupt.input_ids.shape[1]
    cut_k = seq_k - min(seq_k, max(span, metric.logits_to_keep))
    logits = run_with_handler(
        model, arch, corrupt.input_ids[:, cut_k:], corrupt.attention_mask, metric.logits_to_keep, rec_k,
        past_key_values=_prefix_cache(model, corrupt, cut_k),
    )
    m_corrupt = metric(logits, corrupt)
    target = {site: align_to_clean(rec_c.acts[site], rec_k.acts[site], window) for site in rec_c.acts}
    return PairBatch(
        clean, clean.input_ids[:, cut:], clean.attention_mask, cache, window, rec_c.acts, target,
        m_clean.detach(), m_corrupt.detach(), metric,
    )


def _prefix_cache(model, encoded: Encoded, cut: int):
    """KV cache of positions ``[0, cut)`` (None when ``cut`` is 0); no activations nor logits are kept."""
    if cut <= 0:
        return None
    ids, mask = encoded.input_ids[:, :cut], encoded.attention_mask[:, :cut]
    return model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values


def iter_pair_batches(
    model, arch, tokenizer, metric, clean: list[str], corrupt: list[str], batch_size: int, n_positions: int | str | None,
    max_memory_mb: float | None = None,
) -> Iterator[tuple[list[int], PairBatch]]:
    """Batches of pairs sorted by clean length (less padding); yields (original indices, batch).

    With ``max_memory_mb``, a batch holds at most as many pairs as fit that budget
    (``plan_batches``); each batch's scores do not depend on how pairs are grouped.
    """
    for idx in plan_batches(model, arch, tokenizer, metric, clean, corrupt, batch_size, n_positions, max_memory_mb):
        yield idx, prepare_pair_batch(model, arch, tokenizer, metric, [clean[i] for i in idx], [corrupt[i] for i in idx], n_positions)


# ----------------------------------------------------------------------------- memory bound

ACT_WIDTHS = (12, 4)
"""Per layer and position, autograd keeps about ``12 · d_model + 4 · d_mlp`` values of one
forward pass for the backward (norm inputs, q/k/v, attention output, residuals; MLP gate,
up, activation and product)."""


def batch_memory_bytes(arch: Architecture, vocab: int, rows: int, seq: int, span: int, keep: int, dtype_bytes: int) -> int:
    """Estimated peak bytes of EAP/EAP-IG on one batch, on top of the model's weights.

    ``rows`` input rows of ``seq`` tokens, of which the last ``span`` are run with hooks
    (the window; earlier positions live only in the KV cache). Terms: node activations
    on the window (clean, corrupted target, the interpolated values kept for gradients,
    and their gradients: 4 copies of ``[rows, span, n_layers, n_heads·head_dim + d_model]``),
    keys and values over all ``seq`` positions (the cache, its per-pass copy, and the copy
    repeated to every query head that attention saves for the backward), the activations
    autograd saves over the window (``ACT_WIDTHS``) and attention weights
    ``[rows, n_heads, span, seq]`` per layer, and float32 logits ``[rows, keep, vocab]``
    with their log-softmax and gradient. IG steps run one at a time, so the step count
    does not enter. How it compares with the measured peak: docs/scaling.md (bench/scaling.py).
    """
    layers = arch.n_layers
    nodes = 4 * rows * span * layers * (arch.n_heads * arch.head_dim + arch.d_model) * dtype_bytes
    kv = rows * seq * layers * 2 * arch.head_dim * (2 * arch.n_kv_heads + arch.n_heads) * dtype_bytes
    saved = rows * span * layers * (ACT_WIDTHS[0] * arch.d_model + ACT_WIDTHS[1] * arch.d_mlp) * dtype_bytes
    attn = rows * arch.n_heads * span * seq * layers * dtype_bytes
    logits = 3 * rows * keep * vocab * 4
    return nodes + kv + saved + attn + logits


def plan_batches(
    model, arch: Architecture, tokenizer, metric: Metric, clean: list[str], corrupt: list[str], batch_size: int,
    n_positions: int | str | None, max_memory_mb: float | None = None,
) -> list[list[int]]:
    """Pair indices per batch: sorted by clean length, ``batch_size`` at most, and (with
    ``max_memory_mb``) no more pairs than ``batch_memory_bytes`` allows in that budget."""
    lengths = [len(t) for t in format_chat(tokenizer, clean)]
    order = sorted(range(len(clean)), key=lambda i: (lengths[i], i))
    if max_memory_mb is None:
        return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    budget = max_memory_mb * 2**20
    cost = pair_batch_cost(model, arch, tokenizer, metric, clean, corrupt, n_positions)
    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and cost(batches[-1] + [i]) <= budget:
            batches[-1].append(i)
            continue
        if cost([i]) > budget:
            raise CdeltaError(
                f"one prompt pair needs about {cost([i]) / 2**20:.0f} MB for attribution, above the {max_memory_mb:g} MB budget",
                f"raise --max-memory-mb to at least {cost([i]) / 2**20:.0f}, or use fewer positions (n_positions='suffix')",
            )
        batches.append([i])
    return batches


def pair_batch_cost(model, arch: Architecture, tokenizer, metric: Metric, clean: list[str], corrupt: list[str], n_positions):
    """``cost(pair indices) -> bytes`` (``batch_memory_bytes``) from each pair's token counts and window."""
    enc_c, enc_k = metric.encode(tokenizer, clean), metric.encode(tokenizer, corrupt)
    width = windows(enc_c, enc_k, template_prefix_len(tokenizer), template_suffix_len(tokenizer), n_positions).sum(1)
    row_example = enc_c.row_example.tolist()
    rows_per_pair = len(row_example) // len(clean)
    seq_c, seq_k = enc_c.lengths.tolist(), enc_k.lengths.tolist()
    dtype_bytes = next(model.parameters()).element_size()
    vocab = model.get_output_embeddings().weight.shape[0]

    def cost(idx: list[int]) -> int:
        chosen = set(idx)
        rows = [r for r, e in enumerate(row_example) if e in chosen]
        seq = max(max(seq_c[r], seq_k[r]) for r in rows)
        keep = min(metric.logits_to_keep, seq)
        span = max(max(int(width[r]) for r in rows), keep)
        return batch_memory_bytes(arch, vocab, rows_per_pair * len(idx), seq, span, keep, dtype_bytes)

    return cost


def _site_contribution(pb: PairBatch, site: Site, grad: torch.Tensor) -> torch.Tensor:
    """Per-example ``sum over window positions and dims of (clean - corrupt) * grad``.

    Attention sites give ``[n_examples, n_heads]``, MLP sites ``[n_examples]``.
    """
    delta = pb.clean_acts[site] - pb.target[site]
    prod = (delta.double() * grad.double()).sum(-1)  # [rows, seq(, heads)]
    window = pb.window.to(prod.device)
    mask = window if prod.dim() == 2 else window[..., None]
    prod = torch.where(mask, prod, torch.zeros((), dtype=prod.dtype, device=prod.device))
    return pb.to_examples(prod.sum(1))


def _store(scores: torch.Tensor, site: Site, contrib: torch.Tensor, arch: Architecture) -> None:
    """Add a site's per-example contribution into ``scores`` ``[n_examples, n_layers, n_heads + 1]``."""
    layer, kind = site
    if kind == ATTN:
        scores[:, layer, : arch.n_heads] += contrib.cpu()
    elif kind == MLP:
        scores[:, layer, arch.n_heads] += contrib.cpu()


class _Interpolate:
    """Handler: replace chosen sites by ``a_corr + α (a_clean - a_corr)`` and keep tensors for gradients.

    ``cut``: ``{site: head mask or None}``; a head mask restricts an attention site to some
    heads (the others keep their natural value). ``straight_through``: the replaced value
    passes gradients to its natural computation (needs ``grad_root``); otherwise the
    replaced value is a leaf and gradients stop there.
    """

    def __init__(self, pb: PairBatch, alpha: float, cut: dict[Site, torch.Tensor | None], grad_sites, straight_through: bool):
        self.pb, self.alpha, self.cut, self.grad_sites, self.st = pb, alpha, cut, set(grad_sites), straight_through
        self.kept: dict[Site, torch.Tensor] = {}

    def __call__(self, site: Site, act: torch.Tensor) -> torch.Tensor:
        new = act
        if site in self.cut:
            clean, target = self.pb.clean_acts[site], self.pb.target[site]
            value = target + self.alpha * (clean - target)
            heads = self.cut[site]
            if heads is not None:
                value = torch.where(heads.view(1, 1, -1, 1).to(act.device), value, act.detach())
            if self.st:
                new = act + (value - act).detach()
            else:
                new = value.detach().requires_grad_(site in self.grad_sites)
        if site in self.grad_sites:
            self.kept[site] = new
        return new


def ig_pass(model, arch, pb: PairBatch, alpha: float, cut, grad_sites, straight_through: bool) -> dict[Site, torch.Tensor]:
    """One interpolated forward + backward; returns per-example contributions per grad site."""
    handler = _Interpolate(pb, alpha, cut, grad_sites, straight_through)
    with torch.enable_grad():
        m = pb.forward(model, arch, handler, grad_root=straight_through)
        sites = [s for s in grad_sites if s in handler.kept]
        grads = torch.autograd.grad(m.sum(), [handler.kept[s] for s in sites], allow_unused=True)
    out = {}
    for site, g in zip(sites, grads):
        if g is None:
            g = torch.zeros_like(handler.kept[site])
        out[site] = _site_contribution(pb, site, g.detach())
    return out


def midpoint_alphas(steps: int) -> list[float]:
    """IG interpolation points ``(k + 0.5) / steps`` (midpoint Riemann rule)."""
    return [(k + 0.5) / steps for k in range(steps)]


def integrated_gradients(
    model, arch, pb: PairBatch, steps: int, cut: dict[Site, torch.Tensor | None], on_pass: OnPass = None
) -> dict[Site, torch.Tensor]:
    """IG with only the sites (heads) in ``cut`` interpolated; everything else computed naturally.

    Returns per-example contributions for the cut's sites. By completeness, summed over
    the cut they approximate ``m(clean) - m(cut patched to corrupted)`` (exact as steps →
    ∞, and for one node alone).
    """
    total: dict[Site, torch.Tensor] = {}
    for alpha in midpoint_alphas(steps):
        contrib = ig_pass(model, arch, pb, alpha, cut, list(cut), straight_through=False)
        for site, c in contrib.items():
            total[site] = total.get(site, 0) + c / steps
        if on_pass:
            on_pass()
    return total


@torch.no_grad()
def patch_metric(model, arch, pb: PairBatch, patch: dict[Site, torch.Tensor | None], source: dict[Site, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-example metric of the clean run with some nodes' window activations replaced.

    ``patch``: ``{site: head mask or None (whole site)}``. ``source`` defaults to the
    aligned corrupted activations (``pb.target``); outside the window nothing changes.
    """
    source = pb.target if source is None else source

    def handler(site, act):
        if site not in patch:
            return act
        mask = pb.window.to(act.device)
        heads = patch[site]
        if heads is not None:
            mask = mask[:, :, None] & heads.view(1, 1, -1).to(act.device)
        return replace_where(act, mask, source[site])

    return pb.forward(model, arch, handler)


def _site_mask(pb: PairBatch, site: Site, heads: torch.Tensor | None, n_heads: int) -> torch.Tensor:
    """Window mask of one patch entry: ``[rows, T, n_heads]`` for attention, ``[rows, T]`` for MLP."""
    if site[1] != ATTN:
        return pb.window
    if heads is None:
        return pb.window[:, :, None].expand(-1, -1, n_heads)
    return pb.window[:, :, None] & heads.view(1, 1, -1).to(pb.window.device)


@torch.no_grad()
def patch_metrics(
    model, arch, pb: PairBatch, patches: list[dict], source: dict[Site, torch.Tensor] | None = None, max_rows: int = 64
) -> list[torch.Tensor]:
    """``patch_metric`` for many patch specs, several per forward pass.

    The batch is replicated (row ``r * k + j`` runs spec ``j``), so ``k`` specs cost one
    wider forward pass instead of ``k`` narrow ones (up to ``max_rows`` rows per pass).
    Returns one per-example metric ``[n_examples]`` per spec, in order.
    """
    source = pb.target if source is None else source
    rows = pb.input_ids.shape[0]
    per_pass = max(1, max_rows // rows)
    keep = min(pb.metric.logits_to_keep, pb.input_ids.shape[1])
    out: list[torch.Tensor] = []
    for start in range(0, len(patches), per_pass):
        chunk = patches[start : start + per_pass]
        k = len(chunk)
        masks: dict[Site, torch.Tensor] = {}
        for site in sorted({site for spec in chunk for site in spec}):
            per_spec = [
                _site_mask(pb, site, spec[site], arch.n_heads) if site in spec else torch.zeros_like(_site_mask(pb, site, None, arch.n_heads))
                for spec in chunk
            ]
            masks[site] = torch.stack(per_spec, dim=1).flatten(0, 1)
        sources = {site: source[site].repeat_interleave(k, dim=0) for site in masks}

        def handler(site, act, masks=masks, sources=sources):
            return replace_where(act, masks[site].to(act.device), sources[site]) if site in masks else act

        cache = None
        if pb.prefix_cache is not None:
            cache = copy.deepcopy(pb.prefix_cache)
            cache.batch_repeat_interleave(k)
        logits = run_with_handler(
            model, arch, pb.input_ids.repeat_interleave(k, dim=0), pb.attention_mask.repeat_interleave(k, dim=0), keep, handler,
            past_key_values=cache,
        )
        logits = logits.view(rows, k, *logits.shape[1:])
        out += [pb.metric(logits[:, j], pb.clean) for j in range(k)]
    return out


# ----------------------------------------------------------------------------- result


@dataclass
class AttributionResult:
    """Node scores of one attribution run.

    ``scores``: ``[n_layers, n_heads + 1]`` (column ``n_heads`` = MLP), mean over examples;
    ``per_example``: ``[n_examples, n_layers, n_heads + 1]`` in the order of the given
    pairs. ``m_clean``/``m_corrupt``: per-example metric of the unmodified runs.
    """

    arch: Architecture
    scores: torch.Tensor
    per_example: torch.Tensor
    method: str
    steps: int
    metric: dict
    n_positions: int | str | None
    m_clean: torch.Tensor
    m_corrupt: torch.Tensor
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def n_pairs(self) -> int:
        return int(self.per_example.shape[0])

    def node_ids(self) -> list[str]:
        return node_ids(self.arch)

    def node_scores(self) -> dict[str, float]:
        """``{node_id: score}`` in canonical node order."""
        return dict(zip(self.node_ids(), self.scores.flatten().tolist()))


def count_passes(method: str, arch: Architecture, n_pairs: int, batch_size: int, steps: int) -> int:
    """Progress ticks of ``attribute``: one per forward(+backward) pass, or per node for ``exact`` (batched)."""
    n_batches = -(-n_pairs // batch_size)
    n_nodes = arch.n_layers * (arch.n_heads + 1)
    per_batch = {
        "eap": 1,
        "eap-ig": steps,
        "eap-ig-inputs": steps,
        "eap-ig-layer": 2 * arch.n_layers * steps,
        "exact": n_nodes,
    }[method]
    return n_batches * (2 + per_batch)


def attribute(
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
    max_memory_mb: float | None = None,
) -> AttributionResult:
    """Score every node for the clean-vs-corrupted refusal difference (see module docstring).

    ``clean[i]`` is paired with ``corrupt[i]``. Deterministic: no sampling happens here.
    ``max_memory_mb`` bounds the working memory on top of the weights: pairs are split into
    smaller batches (``plan_batches``), IG steps run one at a time, only the window's
    positions are ever recorded, and ``exact`` does not replicate rows beyond a batch.
    """
    if method not in METHODS:
        raise CdeltaError(f"unknown attribution method '{method}'", f"use one of: {', '.join(METHODS)}")
    if len(clean) != len(corrupt) or not clean:
        raise CdeltaError(f"need equally many clean and corrupted prompts (got {len(clean)} and {len(corrupt)})", "pass paired lists")
    if steps < 1:
        raise CdeltaError("steps must be at least 1", "pass steps >= 1")
    check_positions(n_positions)
    arch = architecture_of(model)
    metric_obj = get_metric(metric, tokenizer)
    n, shape = len(clean), (arch.n_layers, arch.n_heads + 1)
    per_example = torch.zeros((n, *shape), dtype=torch.float64)
    m_clean, m_corrupt = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    sites = node_sites(arch)
    start = time.perf_counter()
    with frozen(model):
        for idx, pb in iter_pair_batches(model, arch, tokenizer, metric_obj, clean, corrupt, batch_size, n_positions, max_memory_mb):
            if on_pass:
                on_pass()
                on_pass()
            scores = torch.zeros((pb.n_examples, *shape), dtype=torch.float64)
            if method == "eap":
                contrib = ig_pass(model, arch, pb, 1.0, {}, sites, straight_through=True)
                for site, c in contrib.items():
                    _store(scores, site, c, arch)
                if on_pass:
                    on_pass()
            elif method in ("eap-ig", "eap-ig-inputs"):
                cut = {s: None for s in sites} if method == "eap-ig" else {EMBED_SITE: None}
                for alpha in midpoint_alphas(steps):
                    contrib = ig_pass(model, arch, pb, alpha, cut, sites, straight_through=True)
                    for site, c in contrib.items():
                        _store(scores, site, c / steps, arch)
                    if on_pass:
                        on_pass()
            elif method == "eap-ig-layer":
                for site in sites:
                    for s, c in integrated_gradients(model, arch, pb, steps, {site: None}, on_pass).items():
                        _store(scores, s, c, arch)
            elif method == "exact":
                m0 = pb.m_clean.double().cpu()
                specs, where = [], []
                for layer in range(arch.n_layers):
                    for h in range(arch.n_heads):
                        heads = torch.zeros(arch.n_heads, dtype=torch.bool)
                        heads[h] = True
                        specs.append({(layer, ATTN): heads})
                        where.append((layer, h))
                    specs.append({(layer, MLP): None})
                    where.append((layer, arch.n_heads))
                rows = exact_rows if max_memory_mb is None else pb.input_ids.shape[0]
                for (layer, col), m in zip(where, patch_metrics(model, arch, pb, specs, max_rows=rows)):
                    scores[:, layer, col] = m0 - m.double().cpu()
                if on_pass:
                    for _ in specs:
                        on_pass()
            per_example[idx] = scores
            m_clean[idx] = pb.m_clean.double().cpu()
            m_corrupt[idx] = pb.m_corrupt.double().cpu()
    return AttributionResult(
        arch=arch,
        scores=per_example.mean(0),
        per_example=per_example,
        method=method,
        steps=1 if method in ("eap", "exact") else steps,
        metric=metric_obj.describe(),
        n_positions=n_positions,
        m_clean=m_clean,
        m_corrupt=m_corrupt,
        seconds=time.perf_counter() - start,
    )
