"""NeST (Neuron Selective Tuning): find safety neurons, cluster them, tune only them.

1. **Activations.** Every MLP neuron's activation (the input of ``down_proj``) is
   max-pooled over each prompt's tokens — the user message and the template's closing
   tokens; the template's leading tokens are identical for every prompt and left out.
2. **Selection.** Each neuron is scored by how well its pooled activation separates
   target-category harmful prompts from harmless ones: the standardized mean difference
   ``d = (mean_target − mean_harmless) / pooled_std`` (a one-neuron linear probe's
   separation). Neurons whose ``|d|`` lies ``z_threshold`` standard deviations above the
   mean ``|d|`` of all neurons are kept, at most ``max_neurons`` (largest ``|d|`` first).
3. **Clusters.** The kept neurons are grouped by k-means (k-means++ seeding, torch) on
   their standardized activation profiles over all probe prompts.
4. **Tuning.** Toward refusal replies on the target category, with the retain KL of
   ``cdelta.edit.train``. With ``tie=True`` (the paper's shared cluster updates) every
   cluster ``c`` learns one gate-row update, one up-row update and one down-column update
   (each ``[d_model]``) shared by all its neurons, so the trained parameters are
   ``n_clusters × 3 × d_model`` while ``n_neurons × 3 × d_model`` weight entries change;
   with ``tie=False`` each neuron's rows/columns are trained independently by
   ``masked_finetune``. Either way the update is folded into the weights (no hooks).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from torch.func import functional_call

from cdelta.baselines.neurons import neuron_ids, neuron_param_masks
from cdelta.circuits.attribution import frozen, template_prefix_len
from cdelta.directions.vectors import generation_position_ids
from cdelta.edit.batches import ReplyBatch, build_reply_batch, reply_kl, reply_logits, reply_nll
from cdelta.edit.delta import Delta
from cdelta.edit.train import EditData, TrainConfig, index_batches, masked_finetune, reference_logprobs
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of, mlp_proj, require_separate_mlp
from cdelta.models.chat import encode_chat
from cdelta.ui import progress_bar


@dataclass
class NestConfig:
    """Neuron selection, clustering and tuning settings (see module docstring).

    ``lr`` is the tuning's learning rate: the shared cluster updates are few parameters
    (``n_clusters × 3 × d_model``), and at C-Δθ's 1e-3 five steps left SmolLM2's refusal
    unchanged where 1e-2 moved it (docs/methods/nest_safeseek.md).
    """

    z_threshold: float = 3.0
    max_neurons: int = 256
    n_clusters: int = 8
    tie: bool = True
    lr: float = 1e-2
    batch_size: int = 8
    seed: int = 0


@dataclass
class SafetyNeurons:
    """Selected neurons and their clusters.

    ``selected``: bool ``[n_layers, d_mlp]``; ``scores``: float ``[n_layers, d_mlp]`` (the
    standardized mean difference ``d`` of every neuron); ``labels[i]``: cluster of the
    ``i``-th selected neuron in layer-major order (the order of ``ids()``).
    """

    selected: torch.Tensor
    scores: torch.Tensor
    labels: list[int]
    meta: dict = field(default_factory=dict)

    def ids(self) -> list[str]:
        return neuron_ids(self.selected)

    @property
    def n_clusters(self) -> int:
        return len(set(self.labels))

    def clusters(self) -> list[list[str]]:
        """Neuron ids per cluster, clusters in label order."""
        ids = self.ids()
        return [[n for n, label in zip(ids, self.labels) if label == c] for c in sorted(set(self.labels))]

    def to_dict(self) -> dict:
        """JSON-able summary: ids, clusters, each selected neuron's score, and ``meta``."""
        kept = self.scores[self.selected].tolist()
        return {**self.meta, "neurons": self.ids(), "labels": list(self.labels), "scores": kept, "n_clusters": self.n_clusters}


# ----------------------------------------------------------------------------- activations


@torch.no_grad()
def pooled_neuron_activations(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 8) -> torch.Tensor:
    """Max over each prompt's positions (after the template prefix) of every MLP neuron.

    Returns float32 ``[n_prompts, n_layers, d_mlp]`` on CPU. Positions follow generation
    (left padding, position ids counted from the first real token).
    """
    arch = architecture_of(model)
    device = next(model.parameters()).device
    prefix = template_prefix_len(tokenizer)
    store: dict[int, torch.Tensor] = {}

    def capture(layer: int):
        def hook(_module, args):
            store[layer] = args[0].detach()

        return hook

    handles = [mlp_proj(model, layer, "down").register_forward_pre_hook(capture(layer)) for layer in range(arch.n_layers)]
    rows = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = encode_chat(tokenizer, prompts[start : start + batch_size], device)
            mask = batch["attention_mask"]
            model.get_decoder()(**batch, position_ids=generation_position_ids(mask), use_cache=False)
            first = mask.shape[1] - mask.sum(1) + prefix
            outside = (torch.arange(mask.shape[1], device=device)[None, :] < first[:, None])[..., None]
            pooled = [store[layer].float().masked_fill(outside, float("-inf")).amax(1) for layer in range(arch.n_layers)]
            rows.append(torch.stack(pooled, 1).cpu())
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def separation_scores(target: torch.Tensor, contrast: torch.Tensor) -> torch.Tensor:
    """Standardized mean difference per neuron, ``[n_layers, d_mlp]``.

    ``target``/``contrast``: pooled activations ``[n, n_layers, d_mlp]`` (n ≥ 2 together
    with at least 3 prompts). ``d = (mean_t − mean_c) / sqrt(pooled variance)``; a neuron
    that is constant on both groups scores 0.
    """
    n_t, n_c = len(target), len(contrast)
    if n_t < 2 or n_c < 2:
        raise CdeltaError(f"neuron scoring needs at least 2 prompts per group (got {n_t} target, {n_c} contrast)", "add train-split prompts")
    pooled_var = ((n_t - 1) * target.var(0) + (n_c - 1) * contrast.var(0)) / (n_t + n_c - 2)
    diff = target.mean(0) - contrast.mean(0)
    std = pooled_var.sqrt()
    return torch.where(std > 0, diff / std.clamp_min(1e-12), torch.zeros_like(diff))


def select_neurons(scores: torch.Tensor, z_threshold: float, max_neurons: int) -> torch.Tensor:
    """Bool ``[n_layers, d_mlp]``: neurons with z-scored ``|score|`` ≥ ``z_threshold``, the ``max_neurons`` largest."""
    magnitude = scores.abs().flatten()
    z = (magnitude - magnitude.mean()) / magnitude.std().clamp_min(1e-12)
    order = magnitude.argsort(descending=True, stable=True)[: max(0, max_neurons)]
    chosen = torch.zeros_like(magnitude, dtype=torch.bool)
    chosen[order] = True
    return (chosen & (z >= z_threshold)).reshape(scores.shape)


def kmeans(points: torch.Tensor, k: int, seed: int = 0, max_iter: int = 100) -> torch.Tensor:
    """Cluster labels ``[n]`` of ``points`` ``[n, dim]``: Lloyd's algorithm, k-means++ seeding.

    Deterministic given ``seed``; an emptied cluster keeps its previous centre.
    """
    n = len(points)
    k = max(1, min(k, n))
    generator = torch.Generator().manual_seed(seed)
    points = points.double()
    centres = [points[torch.randint(n, (1,), generator=generator)].squeeze(0)]
    for _ in range(1, k):
        dist = torch.cdist(points, torch.stack(centres)).min(1).values ** 2
        pick = torch.multinomial(dist, 1, generator=generator) if dist.sum() > 0 else torch.randint(n, (1,), generator=generator)
        centres.append(points[pick].squeeze(0))
    centre = torch.stack(centres)
    labels = torch.full((n,), -1, dtype=torch.long)
    for _ in range(max_iter):
        new = torch.cdist(points, centre).argmin(1)
        if torch.equal(new, labels):
            break
        labels = new
        for c in range(k):
            if (labels == c).any():
                centre[c] = points[labels == c].mean(0)
    return labels


def _standardize_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row shifted to mean 0 and scaled to unit std (constant rows become 0)."""
    centred = x - x.mean(1, keepdim=True)
    return centred / centred.std(1, keepdim=True).clamp_min(1e-12)


def find_safety_neurons(model: torch.nn.Module, tokenizer, target: list[str], contrast: list[str], config: NestConfig) -> SafetyNeurons:
    """NeST steps 1–3 on ``target`` (harmful, target category) vs ``contrast`` (harmless) prompts."""
    require_separate_mlp(model, "NeST")
    acts_t = pooled_neuron_activations(model, tokenizer, target, config.batch_size)
    acts_c = pooled_neuron_activations(model, tokenizer, contrast, config.batch_size)
    scores = separation_scores(acts_t, acts_c)
    selected = select_neurons(scores, config.z_threshold, config.max_neurons)
    if not selected.any():
        raise CdeltaError(f"no MLP neuron separates the prompt groups at z ≥ {config.z_threshold}", "lower z_threshold or use more prompts")
    profiles = _standardize_rows(torch.cat([acts_t, acts_c])[:, selected].T)
    labels = kmeans(profiles, config.n_clusters, config.seed).tolist()
    meta = {"z_threshold": config.z_threshold, "max_neurons": config.max_neurons, "n_target": len(target), "n_contrast": len(contrast)}
    return SafetyNeurons(selected, scores, labels, meta)


# ----------------------------------------------------------------------------- tuning


class ClusterUpdates(torch.nn.Module):
    """Shared per-cluster weight updates of the selected neurons (NeST's tied tuning).

    ``gate``/``up``/``down``: trainable ``[n_clusters, d_model]`` (float32, zero at start).
    Neuron ``j`` of layer ``l`` in cluster ``c`` gets ``gate[c]`` added to row ``j`` of
    ``gate_proj``, ``up[c]`` to row ``j`` of ``up_proj`` and ``down[c]`` to column ``j`` of
    ``down_proj``. ``weights(prefix)`` and ``deltas()`` mirror ``edit.train.CircuitSlices``.
    """

    def __init__(self, model: torch.nn.Module, arch: Architecture, neurons: SafetyNeurons) -> None:
        super().__init__()
        params = dict(model.named_parameters())
        labels = torch.tensor(neurons.labels)
        positions = neurons.selected.nonzero()
        self.rows: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for layer in positions[:, 0].unique().tolist():
            in_layer = positions[:, 0] == layer
            self.rows[layer] = (positions[in_layer, 1], labels[in_layer])
        self.arch = arch
        self.base = {arch.mlp_param(layer, proj): params[arch.mlp_param(layer, proj)].detach() for layer in self.rows for proj in ("gate", "up", "down")}
        n_clusters = int(labels.max()) + 1
        self.gate, self.up, self.down = (torch.nn.Parameter(torch.zeros(n_clusters, arch.d_model)) for _ in range(3))

    def _parts(self):
        """``(param name, dim, neuron indices [k], update rows/columns)`` per touched tensor."""
        for layer, (rows, labels) in self.rows.items():
            yield self.arch.mlp_param(layer, "gate"), 0, rows, self.gate[labels]
            yield self.arch.mlp_param(layer, "up"), 0, rows, self.up[labels]
            yield self.arch.mlp_param(layer, "down"), 1, rows, self.down[labels].T

    def weights(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix + name: base + folded update}`` in the model's dtype and device (differentiable)."""
        out = {}
        for name, dim, rows, update in self._parts():
            base = self.base[name]
            out[prefix + name] = base.float().index_add(dim, rows.to(base.device), update.to(base.device)).to(base.dtype)
        return out

    @torch.no_grad()
    def deltas(self) -> Delta:
        """``{name: delta}``: dense float32 on CPU, zero outside the selected rows/columns."""
        return {name: torch.zeros(self.base[name].shape).index_add(dim, rows, update) for name, dim, rows, update in self._parts()}

    def n_trainable(self) -> int:
        return sum(p.numel() for p in self.parameters())


class _Replies(torch.nn.Module):
    """``reply_logits`` as a module, so ``functional_call`` can swap in edited weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: ReplyBatch) -> torch.Tensor:
        return reply_logits(self.model, batch)


def tied_finetune(model: torch.nn.Module, tokenizer, updates: ClusterUpdates, data: EditData, config: TrainConfig, progress: bool = True) -> Delta:
    """Train ``updates`` with ``masked_finetune``'s objective (reply NLL + weighted retain KL).

    Same batches, seeds and losses as ``cdelta.edit.train.masked_finetune``; only the
    trained parameters differ (shared cluster vectors instead of masked entries).
    Returns the folded weight change ``{name: delta}``; ``model`` is unchanged.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    device = next(model.parameters()).device
    use_retain = bool(data.retain) and config.retain_weight > 0
    ref_logprobs = reference_logprobs(model, tokenizer, data.retain, config) if use_retain else []
    objective = _Replies(model)
    optimizer = torch.optim.AdamW(list(updates.parameters()), lr=config.lr, weight_decay=0.0)
    target_iter = index_batches(len(data.target), config.batch_size, rng)
    retain_iter = index_batches(len(data.retain), config.retain_batch_size, rng) if use_retain else None

    def batch_of(pairs: list[tuple[str, str]]) -> ReplyBatch:
        return build_reply_batch(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], config.max_reply_tokens).to(device)

    was_training = model.training
    try:
        with frozen(model), progress_bar(progress) as bar:
            model.train()
            task = bar.add_task("NeST", total=config.steps)
            for _ in range(config.steps):
                weights = updates.weights(prefix="model.")
                batch = batch_of([data.target[i] for i in next(target_iter)])
                loss = reply_nll(functional_call(objective, weights, (batch,)), batch)
                if retain_iter is not None:
                    index = next(retain_iter)
                    batch = batch_of([data.retain[i] for i in index])
                    ref = torch.cat([ref_logprobs[i] for i in index]).to(device).float()
                    logits = functional_call(objective, weights, (batch,))
                    loss = loss + config.retain_weight * reply_kl(logits, ref, batch, config.first_token_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.advance(task)
    finally:
        model.train(was_training)
    return updates.deltas()


def nest_delta(model: torch.nn.Module, tokenizer, neurons: SafetyNeurons, data: EditData, config: TrainConfig, tie: bool = True, progress: bool = True) -> Delta:
    """NeST step 4: the weight change from tuning only ``neurons`` (tied per cluster, or not)."""
    arch = architecture_of(model)
    if tie:
        return tied_finetune(model, tokenizer, ClusterUpdates(model, arch, neurons), data, config, progress)
    return masked_finetune(model, tokenizer, neuron_param_masks(model, arch, neurons.selected), data, config, progress=progress, description="NeST (untied)")
