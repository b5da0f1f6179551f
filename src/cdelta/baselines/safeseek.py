"""SafeSeek: a safety circuit of attention heads and MLP neurons found by optimizing masks.

**Masks.** Every attention head ``(l, h)`` and MLP neuron ``(l, j)`` has a keep-logit
``s``; its mask is ``σ(s / T)`` binarized at 0.5 in the forward pass with the sigmoid's
gradient in the backward pass (straight-through). A head's mask multiplies its slice of
the ``o_proj`` input, a neuron's mask its channel of the ``down_proj`` input. The
circuit is the set of components whose mask is 0 (``s ≤ 0``); all logits start at
``init_logit`` (> 0: nothing in the circuit).

**Objective** (per the paper: "removing the circuit removes the behaviour, the circuit
alone keeps it", plus sparsity), on the refusal log-odds ``m`` of the first reply token
(``cdelta.circuits.metric.LogOddsMetric``; ``σ(m)`` is the probability of a refusal
opener among refusal and compliance openers)::

    L = w_nec · mean softplus(margin(m | circuit removed))
      + w_suf · mean softplus(−margin(m | only the circuit kept))
      + λ_heads · Σ_heads (1 − σ(s/T)) + λ_neurons · Σ_neurons (1 − σ(s/T))

``softplus(x) = −log σ(−x)`` is the cross-entropy of "complies" given refusal log-odds
``x``. The margin depends on the mode:

``refusal`` (the paper's setting: the base refuses the target category)
    ``margin = m(target prompt)``: with the circuit removed the model should open with a
    compliance rather than a refusal token, with only the circuit it should refuse.
``gap`` (a base that refuses almost nothing, e.g. SmolLM2-135M)
    There is no refusal to remove. The faithful analogue is the circuit that *carries the
    target category's excess refusal log-odds*: ``margin = m(target_i) − m(contrast_i)``
    over (target, harmless) prompt pairs under the same intervention; removing the circuit
    should make target prompts no more refusal-leaning than harmless ones, the circuit
    alone should keep them more so. This is the same contrast ``cdelta localize`` uses
    when the base does not refuse (``contrast=harmless``).

``auto`` picks ``refusal`` when at least ``refusal_fraction`` of the target prompts
already open refusal-leaning (``m > 0``) under the base model, else ``gap``.

**Sparsity cost (changed from the paper).** The paper penalizes the mean mask per module
with weight 0.1 and trains ~650 Adam steps at lr 1e-2; on CPU we can afford tens of
steps, where that penalty's per-component gradient (~1e-5) never competes with the task
gradient and Adam (which moves every logit at ~lr per step whatever its gradient's size)
would flip every component with a consistently signed gradient at once. Here each head
and each neuron has its own cost ``λ`` (a sum, not a mean), calibrated at the first step
so that its gradient equals the ``1 − head_fraction`` (``1 − neuron_fraction``) quantile
of that kind's task-gradient magnitudes; only components whose removal matters more than
that keep moving into the circuit. Defaults are the paper's reported alignment-circuit
sizes (3.03% of heads, 0.79% of neurons); the optimized circuit is whatever the
masks converge to, not forced to that size.

**Safety Circuit Tuning.** The found heads and neurons own parameter entries (a head:
its q rows, its GQA group's k/v rows, its o_proj columns, as in ``cdelta.circuits.circuit``;
a neuron: see ``cdelta.baselines.neurons``); ``masked_finetune`` trains only those toward
refusal of the target category.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from cdelta.baselines.neurons import neuron_ids, neuron_param_masks, parse_neuron_ids
from cdelta.circuits.attribution import frozen
from cdelta.circuits.circuit import node_param_slices
from cdelta.circuits.metric import LogOddsMetric
from cdelta.directions.vectors import generation_position_ids
from cdelta.edit.delta import Delta
from cdelta.edit.masks import merge_masks
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.errors import CdeltaError
from cdelta.models.architecture import Architecture, architecture_of, head_output_proj, mlp_proj, require_separate_mlp
from cdelta.ui import progress_bar

MODES = ("auto", "refusal", "gap")


@dataclass
class SafeSeekConfig:
    """Mask-optimization settings (see module docstring); ``batch_size`` counts target prompts per step."""

    steps: int = 30
    lr: float = 0.1
    init_logit: float = 0.5
    temperature: float = 1.0
    head_fraction: float = 0.0303
    neuron_fraction: float = 0.0079
    necessity_weight: float = 1.0
    sufficiency_weight: float = 1.0
    batch_size: int = 4
    mode: str = "auto"
    refusal_fraction: float = 0.25
    seed: int = 0


# ----------------------------------------------------------------------------- interventions


@contextmanager
def component_scales(model: torch.nn.Module, heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None) -> Iterator[None]:
    """Inside the block, scale every head's output and every MLP neuron by a factor.

    ``heads``: ``[n_layers, n_heads]`` multiplies head ``h``'s slice ``[h·hd, (h+1)·hd)`` of
    the ``o_proj`` input of layer ``l``; ``neurons``: ``[n_layers, d_mlp]`` multiplies
    channel ``j`` of the ``down_proj`` input. Factors may require grad (the product stays
    in the autograd graph); ``None`` leaves that kind untouched.
    """
    arch = architecture_of(model)
    if neurons is not None:
        require_separate_mlp(model, "SafeSeek")
    handles = []

    def scale_heads(layer: int):
        def hook(_module, args):
            x = args[0]
            factor = heads[layer].to(device=x.device, dtype=x.dtype).repeat_interleave(arch.head_dim)
            return (x * factor,) + tuple(args[1:])

        return hook

    def scale_neurons(layer: int):
        def hook(_module, args):
            x = args[0]
            return (x * neurons[layer].to(device=x.device, dtype=x.dtype),) + tuple(args[1:])

        return hook

    try:
        for layer in range(arch.n_layers):
            if heads is not None:
                handles.append(head_output_proj(model, layer).register_forward_pre_hook(scale_heads(layer)))
            if neurons is not None:
                handles.append(mlp_proj(model, layer, "down").register_forward_pre_hook(scale_neurons(layer)))
        yield
    finally:
        for handle in handles:
            handle.remove()


class ComponentMasks(torch.nn.Module):
    """Keep-logits of every head ``[n_layers, n_heads]`` and neuron ``[n_layers, d_mlp]``."""

    def __init__(self, arch: Architecture, init_logit: float) -> None:
        super().__init__()
        self.heads = torch.nn.Parameter(torch.full((arch.n_layers, arch.n_heads), float(init_logit)))
        self.neurons = torch.nn.Parameter(torch.full((arch.n_layers, arch.d_mlp), float(init_logit)))

    def soft(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``σ(s / T)`` for heads and neurons."""
        return torch.sigmoid(self.heads / temperature), torch.sigmoid(self.neurons / temperature)

    def keep(self, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary keep masks (1 = kept) with straight-through sigmoid gradients.

        The forward value is exactly 0 or 1 (``hard + (soft − soft.detach())``).
        """
        return tuple(((s > 0.5).to(s.dtype) + (s - s.detach())) for s in self.soft(temperature))

    @torch.no_grad()
    def circuit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bool ``(heads, neurons)`` in the circuit: keep-logit ≤ 0."""
        return self.heads <= 0, self.neurons <= 0


# ----------------------------------------------------------------------------- the circuit


@dataclass
class SafetyCircuit:
    """Heads (bool ``[n_layers, n_heads]``) and neurons (bool ``[n_layers, d_mlp]``) of a circuit."""

    heads: torch.Tensor
    neurons: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def n_heads(self) -> int:
        return int(self.heads.sum())

    @property
    def n_neurons(self) -> int:
        return int(self.neurons.sum())

    def head_ids(self) -> list[str]:
        return [f"L{layer}.H{head}" for layer, head in self.heads.nonzero().tolist()]

    def neuron_ids(self) -> list[str]:
        return neuron_ids(self.neurons)

    def param_masks(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``{param_name: bool mask}`` of every entry owned by the circuit's heads and neurons."""
        arch = architecture_of(model)
        params = dict(model.named_parameters())
        head_masks: dict[str, torch.Tensor] = {}
        for node in self.head_ids():
            for name, (dim, start, stop) in node_param_slices(arch, node, set(params)):
                mask = head_masks.setdefault(name, torch.zeros(params[name].shape, dtype=torch.bool))
                mask.narrow(dim, start, stop - start).fill_(True)
        return merge_masks(head_masks, neuron_param_masks(model, arch, self.neurons))

    @contextmanager
    def ablated(self, model: torch.nn.Module) -> Iterator[None]:
        """Inside the block, the circuit's heads and neurons output zero."""
        with component_scales(model, (~self.heads).float(), (~self.neurons).float()):
            yield

    def to_dict(self) -> dict:
        return {**self.meta, "heads": self.head_ids(), "neurons": self.neuron_ids(), "n_heads": self.n_heads, "n_neurons": self.n_neurons}

    @classmethod
    def from_dict(cls, data: dict, arch: Architecture) -> SafetyCircuit:
        heads = torch.zeros(arch.n_layers, arch.n_heads, dtype=torch.bool)
        for node in data["heads"]:
            layer, _, head = node.partition(".H")
            heads[int(layer.removeprefix("L")), int(head)] = True
        meta = {k: v for k, v in data.items() if k not in ("heads", "neurons", "n_heads", "n_neurons")}
        return cls(heads, parse_neuron_ids(data["neurons"], arch), meta)


# ----------------------------------------------------------------------------- optimization


def refusal_log_odds(
    model: torch.nn.Module, metric: LogOddsMetric, tokenizer, prompts: list[str], heads: torch.Tensor | None = None, neurons: torch.Tensor | None = None
) -> torch.Tensor:
    """Refusal log-odds of the first reply token ``[len(prompts)]`` under optional component scales."""
    encoded = metric.encode(tokenizer, prompts).to(next(model.parameters()).device)
    position_ids = generation_position_ids(encoded.attention_mask)
    with component_scales(model, heads, neurons):
        logits = model(input_ids=encoded.input_ids, attention_mask=encoded.attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False).logits
    return metric(logits, encoded)


def choose_mode(model: torch.nn.Module, tokenizer, metric: LogOddsMetric, target: list[str], config: SafeSeekConfig) -> tuple[str, float]:
    """``(mode, fraction of target prompts with base log-odds > 0)``; ``config.mode`` unless ``auto``."""
    with torch.no_grad():
        values = torch.cat([refusal_log_odds(model, metric, tokenizer, target[i : i + 8]) for i in range(0, len(target), 8)])
    fraction = float((values > 0).float().mean())
    if config.mode != "auto":
        return config.mode, fraction
    return ("refusal" if fraction >= config.refusal_fraction else "gap"), fraction


def _margin(values: torch.Tensor, n_target: int, mode: str) -> torch.Tensor:
    """Per-example refusal margin: ``m(target)`` (refusal) or ``m(target) − m(contrast)`` (gap)."""
    return values[:n_target] if mode == "refusal" else values[:n_target] - values[n_target:]


def task_terms(
    model: torch.nn.Module, tokenizer, metric: LogOddsMetric, masks: ComponentMasks, target: list[str], contrast: list[str], mode: str, config: SafeSeekConfig
) -> dict[str, torch.Tensor]:
    """Scalars ``necessity`` and ``sufficiency`` on one batch, and their weighted sum ``task``.

    ``contrast`` pairs with ``target`` in ``gap`` mode and is unused in ``refusal`` mode.
    A term whose weight is 0 is not computed (it costs a forward and backward pass).
    """
    prompts = target + (contrast if mode == "gap" else [])
    heads, neurons = masks.keep(config.temperature)
    necessity = sufficiency = heads.new_zeros(())
    if config.necessity_weight:
        necessity = F.softplus(_margin(refusal_log_odds(model, metric, tokenizer, prompts, heads, neurons), len(target), mode)).mean()
    if config.sufficiency_weight:
        sufficiency = F.softplus(-_margin(refusal_log_odds(model, metric, tokenizer, prompts, 1 - heads, 1 - neurons), len(target), mode)).mean()
    task = config.necessity_weight * necessity + config.sufficiency_weight * sufficiency
    return {"task": task, "necessity": necessity, "sufficiency": sufficiency}


def sparsity_cost(masks: ComponentMasks, costs: tuple[float, float], temperature: float) -> torch.Tensor:
    """``λ_heads · Σ (1 − σ(s/T)) + λ_neurons · Σ (1 − σ(s/T))``: the cost of the expected circuit."""
    soft_heads, soft_neurons = masks.soft(temperature)
    return costs[0] * (1 - soft_heads).sum() + costs[1] * (1 - soft_neurons).sum()


def calibrate_costs(masks: ComponentMasks, config: SafeSeekConfig) -> tuple[float, float]:
    """Per-component costs ``(λ_heads, λ_neurons)`` from the task gradients now in ``masks``' ``.grad``.

    ``λ`` makes the cost's gradient ``λ·σ'(s/T)/T`` at the initial logit equal the
    ``1 − fraction`` quantile of the kind's ``|task gradient|``.
    """
    slope = torch.sigmoid(torch.tensor(config.init_logit / config.temperature))
    slope = float(slope * (1 - slope)) / config.temperature
    costs = []
    for logits, fraction in ((masks.heads, config.head_fraction), (masks.neurons, config.neuron_fraction)):
        if logits.grad is None:
            costs.append(0.0)
            continue
        grad = logits.grad.abs().flatten().float()
        costs.append(float(torch.quantile(grad, min(1.0, max(0.0, 1 - fraction)))) / slope)
    return costs[0], costs[1]


def find_circuit(
    model: torch.nn.Module, tokenizer, target: list[str], contrast: list[str], config: SafeSeekConfig, progress: bool = True
) -> SafetyCircuit:
    """Optimize the masks with Adam for ``config.steps`` steps and binarize them.

    ``target``: harmful prompts of the target category; ``contrast``: harmless prompts,
    paired with ``target`` in ``gap`` mode. ``meta`` records the mode, the base's refusal
    fraction, the calibrated costs and the per-step history of every loss term and of the
    circuit's size.
    """
    if config.mode not in MODES:
        raise CdeltaError(f"unknown SafeSeek mode {config.mode!r}", f"use one of: {', '.join(MODES)}")
    if not target:
        raise CdeltaError("SafeSeek needs target prompts", "pass train-split prompts of the target category")
    arch = architecture_of(model)
    metric = LogOddsMetric(tokenizer)
    mode, fraction = choose_mode(model, tokenizer, metric, target, config)
    n_pairs = min(len(target), len(contrast)) if mode == "gap" else len(target)
    if n_pairs == 0:
        raise CdeltaError("SafeSeek's gap mode needs contrast (harmless) prompts", "pass harmless train-split prompts or use mode=refusal")
    masks = ComponentMasks(arch, config.init_logit).to(next(model.parameters()).device)
    optimizer = torch.optim.Adam(masks.parameters(), lr=config.lr)
    rng = random.Random(config.seed)
    costs: tuple[float, float] | None = None
    history = []
    clock = time.perf_counter()
    with frozen(model), progress_bar(progress) as bar:
        task = bar.add_task("SafeSeek masks", total=config.steps)
        for _ in range(config.steps):
            index = rng.sample(range(n_pairs), min(config.batch_size, n_pairs))
            batch_contrast = [contrast[i] for i in index] if mode == "gap" else []
            optimizer.zero_grad(set_to_none=True)
            terms = task_terms(model, tokenizer, metric, masks, [target[i] for i in index], batch_contrast, mode, config)
            if terms["task"].requires_grad:
                terms["task"].backward()
            costs = costs or calibrate_costs(masks, config)
            terms["sparsity"] = sparsity_cost(masks, costs, config.temperature)
            terms["sparsity"].backward()
            optimizer.step()
            heads, neurons = masks.circuit()
            history.append({**{k: float(v.detach()) for k, v in terms.items()}, "circuit_heads": int(heads.sum()), "circuit_neurons": int(neurons.sum())})
            bar.advance(task)
    heads, neurons = (m.cpu() for m in masks.circuit())
    meta = {"mode": mode, "base_refusal_fraction": fraction, "costs": list(costs or ()), "config": vars(config), "history": history, "seconds": time.perf_counter() - clock}
    return SafetyCircuit(heads, neurons, meta)


# ----------------------------------------------------------------------------- tuning


def circuit_tuning_delta(model: torch.nn.Module, tokenizer, circuit: SafetyCircuit, data: EditData, config: TrainConfig, progress: bool = True) -> Delta:
    """Safety Circuit Tuning: ``masked_finetune`` on the circuit's parameter entries only."""
    masks = circuit.param_masks(model)
    if not masks:
        raise CdeltaError("the SafeSeek circuit is empty: nothing to tune", "run more mask steps or raise head_fraction / neuron_fraction")
    return masked_finetune(model, tokenizer, masks, data, config, progress=progress, description="SafeSeek circuit tuning")
