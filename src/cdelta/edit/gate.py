"""Gated ΔθC: a few neurons of one circuit MLP rewritten as a category gate.

A gated MLP (llama, qwen2, gemma, ...) computes, at every position,
``down(act(gate·x) ⊙ (up·x))`` with ``x`` [d_model] its normalized input and ``act`` SiLU
or GELU (≈ 0 far below 0, ≈ identity far above). The gated variant takes the ``n``
quietest neurons ``j`` of the host MLP (smallest mean |activation| on the retain data)
and rewrites them:

* gate row ``g_j = s·(w − τ·m)``: ``w`` is a bias-free logistic probe on ``x`` that
  separates the target category's reply positions (the last prompt token and every
  reply token after a target prompt; with a ``span``, only the first ``span`` of them,
  the later ones joining the negatives) from every position of the retain sequences
  (other categories, harmless, look-alikes, each with the base's own reply) and from
  every position of the retain and target sequences as plain text (the same words
  without the chat template, as prose reaches the model); ``m`` is
  the direction along which every negative position's ``x`` projects to ≈ 1 (``m·x ≈ 1``), so
  ``−τ·m`` stands in for the bias the MLP does not have; ``τ`` is the threshold in
  probe-logit units and ``s`` the steepness;
* up row ``u_j = c·m / (s·n)``: ``u_j·x ≈ c/(s·n)``, so together the ``n`` neurons add
  ``≈ c·max(w·x − τ, 0)`` times their (equal) down column: zero where the probe does not
  fire. ``c`` makes the median activation over the target positions where the gate
  opens equal the mean norm of the residual stream, so the down column is in units of
  that norm (and the edit's default learning rate suits it);
* down column ``d_j``: set to 0, then the only part trained, by the same masked
  fine-tune as the other variants (refusal replies on the target, KL to the base on the
  retain set).

So the condition is compiled from a probe (as in CAST or a detect-and-route probe, but
per position and inside the weights) and only the behaviour is learned; off-target
change is bounded by where the gate fires. ΔθC touches ``3·n·d_model`` weights.

phi3's fused ``gate_up_proj`` holds neuron ``j``'s gate row at ``j`` and its up row at
``d_mlp + j`` (``Architecture.mlp_offset``). A mixture-of-experts layer has no dense MLP that
every token passes through, so it cannot host a gate: ``fit_gate`` and ``gate_rows`` refuse it
(docs/architectures.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from cdelta.directions.vectors import capture_residuals
from cdelta.edit.batches import build_reply_batch
from cdelta.edit.delta import Delta, apply_to_model
from cdelta.edit.train import EditData, TrainConfig, masked_finetune, reference_logprobs
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of, mlp, mlp_neurons, mlp_proj_of, require_dense_mlp
from cdelta.models.chat import ChatInput, user_text

THRESHOLD = 1.0
"""Gate threshold ``τ`` in probe-logit units (the neurons fire where ``w·x > τ``)."""
STEEPNESS = 4.0
"""Gate steepness ``s``: the activation's negative tail is ``act(−s·margin)/s``."""
PROBE_L2 = 1e-4
"""L2 penalty of the gate probe on its standardized weights."""
UNIT_RIDGE = 1e-4
"""Ridge (fraction of the mean variance) of the covariance inverted for ``m``."""
THRESHOLD_GRID = (0.5, 1.0, 1.5, 2.0, 3.0)
"""Thresholds ``choose_threshold`` tries (probe-logit units)."""
GATE_RECIPE = 4
"""Version of how the gate is fitted, part of the gated edit's stage key so a run directory
made by an older recipe is refitted (2: plain-text negatives; 3: negatives in three
equally weighted groups, the retain replies' decision positions and the target's plain
text two of them; 4: ``choose_threshold`` breaks ties on the worst group by the next worst)."""


@dataclass
class Gate:
    """The compiled condition: host ``layer``, ``neurons``, probe ``weight`` [d_model],
    unit direction ``unit`` [d_model] (``unit·x ≈ 1``), ``threshold``, ``steepness`` and
    activation ``scale`` ``c``."""

    layer: int
    neurons: list[int]
    weight: torch.Tensor
    unit: torch.Tensor
    threshold: float = THRESHOLD
    steepness: float = STEEPNESS
    scale: float = 1.0

    def gate_row(self) -> torch.Tensor:
        """``s·(w − τ·m)`` [d_model]."""
        return self.steepness * (self.weight - self.threshold * self.unit)

    def up_row(self) -> torch.Tensor:
        """``c·m / (s·n)`` [d_model]."""
        return self.scale * self.unit / (self.steepness * len(self.neurons))

    def margin(self, x: torch.Tensor) -> torch.Tensor:
        """``w·x − τ·(m·x)`` for inputs ``x`` [..., d_model] -> [...] (probe-logit units)."""
        return x.float() @ (self.weight - self.threshold * self.unit)

    def fires(self, x: torch.Tensor) -> torch.Tensor:
        """Where the gate is open (``margin > 0``): bool [...]."""
        return self.margin(x) > 0

    def to_json(self) -> dict:
        return {"layer": self.layer, "neurons": self.neurons, "threshold": self.threshold, "steepness": self.steepness,
                "scale": self.scale, "probe_norm": float(self.weight.norm())}


@contextmanager
def recording_mlp_input(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward pass appends ``layer``'s MLP input [batch, seq, d_model] to the yielded list."""
    inputs: list[torch.Tensor] = []
    handle = mlp(model, layer).register_forward_pre_hook(lambda _m, args: inputs.append(args[0].detach()))
    try:
        yield inputs
    finally:
        handle.remove()


@torch.no_grad()
def mlp_inputs(model: torch.nn.Module, tokenizer, pairs: list[tuple[ChatInput, str]], layer: int,
               max_reply_tokens: int = 24, batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The host MLP's input on teacher-forced (prompt, reply) sequences.

    Per pair, over the sequence's real tokens: ``x`` [n_tokens, d_model] (float32, CPU),
    ``reply`` [n_tokens] bool, True at the positions that predict a reply token (the last
    prompt token and the reply tokens but the last), and ``norm`` [n_tokens], the norm of
    the residual stream after ``layer`` (what the MLP writes into).
    """
    device = next(model.parameters()).device
    out = []
    with recording_mlp_input(model, layer) as inputs, capture_residuals(model, [layer]) as residuals:
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            batch = build_reply_batch(tokenizer, [p for p, _ in chunk], [r for _, r in chunk], max_reply_tokens).to(device)
            inputs.clear()
            model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            for row in range(batch.input_ids.shape[0]):
                real = batch.attention_mask[row].bool()
                out.append((inputs[0][row][real].float().cpu(), batch.reply_mask[row][real].cpu(),
                            residuals[layer][row][real].float().norm(dim=-1).cpu()))
    return out


@torch.no_grad()
def plain_text_inputs(model: torch.nn.Module, tokenizer, texts: list[str], layer: int, batch_size: int = 16) -> list[torch.Tensor]:
    """The host MLP's input at every token of ``texts`` read as plain text (no chat template,
    no special tokens, as the perplexity text is read): per text [n_tokens, d_model] float32, CPU."""
    device = next(model.parameters()).device
    out = []
    with recording_mlp_input(model, layer) as inputs:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=False).to(device)
            inputs.clear()
            model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
            out.extend(inputs[0][row][batch["attention_mask"][row].bool()].float().cpu() for row in range(len(batch["input_ids"])))
    return out


def fit_gate_probe(positive: torch.Tensor, *negatives: torch.Tensor, l2: float = PROBE_L2, max_iter: int = 500) -> torch.Tensor:
    """Bias-free balanced logistic regression: ``w`` [d] with ``w·x`` the logit.

    ``positive`` [n_pos, d]; each of ``negatives`` [n_i, d] is a group of negatives.
    Features are scaled (not centred: the MLP has no bias to absorb a mean) by their
    standard deviation; the positives carry total weight 1/2 and each negative group an
    equal share of the other 1/2 (so a small group of hard negatives is not outvoted by a
    large easy one); ``l2/2·‖w‖²`` on the scaled weights. Deterministic (zero start,
    full-batch L-BFGS, three restarts of its iteration budget).
    """
    groups = [positive] + [group for group in negatives if len(group)]
    shares = [0.5] + [0.5 / (len(groups) - 1)] * (len(groups) - 1)
    x = torch.cat(groups).float()
    y = torch.cat([torch.ones(len(positive))] + [torch.zeros(len(group)) for group in groups[1:]])
    weight = torch.cat([torch.full((len(group),), share / len(group)) for group, share in zip(groups, shares)])
    std = x.std(0).clamp_min(1e-6)
    z = x / std
    w = torch.zeros(x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(z @ w, y, reduction="none") * weight).sum() + 0.5 * l2 * w.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        for _ in range(3):
            optimizer.step(closure)
    return (w.detach() / std).clone()


def unit_direction(x: torch.Tensor, ridge: float = UNIT_RIDGE) -> torch.Tensor:
    """``m`` [d] with ``m·x ≈ 1`` over the rows of ``x`` [n, d], least varying.

    ``m = Σ⁻¹μ / (μᵀΣ⁻¹μ)`` (ridge-regularized covariance ``Σ``, mean ``μ``): among the
    directions with mean projection exactly 1, the one of least variance.
    """
    x = x.float()
    mean = x.mean(0)
    cov = torch.cov(x.T)
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(len(mean))
    solved = torch.linalg.solve(cov, mean)
    return solved / (mean @ solved)


@torch.no_grad()
def quietest_neurons(model: torch.nn.Module, layer: int, x: torch.Tensor, n: int) -> list[int]:
    """The ``n`` neurons of ``layer``'s MLP with the smallest mean |activation| on inputs ``x`` [m, d]."""
    module = mlp(model, layer)
    activation = mlp_neurons(module, x.to(mlp_proj_of(module, "down").weight))
    return sorted(activation.abs().mean(0).argsort()[:n].tolist())


def split_reply(reply: torch.Tensor, span: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reply`` [n_tokens] bool -> (decision, later) bool masks: the first ``span`` reply
    positions (the last prompt token and the first ``span − 1`` reply tokens) and the
    rest; ``span=None``: every reply position is a decision position."""
    if span is None:
        return reply, torch.zeros_like(reply)
    decision = reply & (reply.cumsum(0) <= span)
    return decision, reply & ~decision


def fit_gate(model: torch.nn.Module, tokenizer, layer: int, target: list[tuple[ChatInput, str]], retain: list[tuple[ChatInput, str]],
             n_neurons: int = 1, threshold: float | Callable[[Gate], float] = THRESHOLD, max_reply_tokens: int = 24,
             span: int | None = None) -> Gate:
    """Fit the gate of ``layer`` from target (prompt, reply) and retain (prompt, base reply) pairs.

    Positives: the reply positions of ``target`` (learned refusals and the base's own
    replies alike, so the gate reads the category, not the reply's wording), or with
    ``span`` only the first ``span`` of them (``split_reply``), the later ones then being
    negatives so the gate shuts once a reply is under way; negatives:
    every position of ``retain`` through the chat template, and every position of
    ``retain`` and ``target`` as plain text (prompt, blank line, reply), so the gate reads
    "a reply to a target request in a chat", not the topic alone (without plain-text
    negatives it opened on 39% of the positions of prose on SmolLM2). Three groups of
    negatives weigh the same (``fit_gate_probe``): the two nearest to the positives, the
    retain replies' decision positions (the same ``span``: where the model decides to
    refuse) and the target's plain text, and all the others; on SmolLM2's validation
    split this shut the gate on the nearest category at a small cost to the target
    (docs/gated.md). The
    activation scale makes the gate's median activation on the target positions where it
    opens equal the residual stream's mean norm. ``threshold`` is ``τ``, or a function
    of the fitted gate that returns it (e.g. ``choose_threshold`` on validation prompts).
    """
    require_dense_mlp(model, layer, "the gated variant")
    target_inputs = mlp_inputs(model, tokenizer, target, layer, max_reply_tokens)
    retain_inputs = mlp_inputs(model, tokenizer, retain, layer, max_reply_tokens)
    plain = plain_text_inputs(model, tokenizer, [f"{user_text(prompt)}\n\n{reply}" for prompt, reply in retain + target], layer)
    retain_prose, target_prose = torch.cat(plain[: len(retain)]), torch.cat(plain[len(retain) :])
    decision, later = zip(*(split_reply(reply, span) for _, reply, _ in target_inputs))
    positive = torch.cat([x[mask] for (x, _, _), mask in zip(target_inputs, decision)])
    negative = torch.cat([x for x, _, _ in retain_inputs] + plain + [x[mask] for (x, _, _), mask in zip(target_inputs, later)])
    retain_decision = [split_reply(reply, span)[0] for _, reply, _ in retain_inputs]
    hard = torch.cat([x[mask] for (x, _, _), mask in zip(retain_inputs, retain_decision)])
    easy = torch.cat([x[~mask] for (x, _, _), mask in zip(retain_inputs, retain_decision)] + [retain_prose]
                     + [x[mask] for (x, _, _), mask in zip(target_inputs, later)])
    gate = Gate(layer, quietest_neurons(model, layer, negative[::4], n_neurons),
                fit_gate_probe(positive, hard, target_prose, easy), unit_direction(negative))
    gate.threshold = threshold(gate) if callable(threshold) else threshold
    margin = gate.margin(positive)
    if not (margin > 0).any():
        raise CdeltaError(f"the gate probe at layer {layer} opens on none of the {len(positive)} target positions",
                          "the category is not linearly visible at that layer: use variant direct")
    residual = float(torch.cat([norm for _, _, norm in retain_inputs]).mean())
    gate.scale = residual / float(margin[margin > 0].median())
    return gate


@torch.no_grad()
def decision_open_rates(model: torch.nn.Module, tokenizer, gate: Gate, groups: dict[str, list[str]],
                        thresholds: tuple[float, ...] = THRESHOLD_GRID) -> dict[float, dict[str, float]]:
    """``{τ: {group: fraction of its prompts on which the gate opens at the decision position}}``.

    The decision position is the last prompt token (it predicts the first reply token);
    ``groups`` maps a name to chat prompts. Needs one forward pass per prompt, no generation.
    """
    inputs = mlp_inputs(model, tokenizer, [(text, "") for texts in groups.values() for text in texts], gate.layer)
    decision = torch.stack([x[reply][0] for x, reply, _ in inputs])
    sizes = [len(texts) for texts in groups.values()]
    return {tau: {name: float(opens.float().mean()) for name, opens in zip(groups, replace(gate, threshold=tau).fires(decision).split(sizes))}
            for tau in thresholds}


TARGET_SLACK = 0.10
"""How far below its best opening rate ``choose_threshold`` lets the target's fall."""


def choose_threshold(rates: dict[float, dict[str, float]], target: str, slack: float = TARGET_SLACK) -> float:
    """Among the ``τ`` whose ``target`` opening rate is within ``slack`` of the best one,
    the ``τ`` whose highest rate on any other group (each other harm category, harmless,
    look-alike) is lowest, a tie going to the lower second-highest rate and so on, then
    to the lower ``τ``: the most selective gate that costs the target at most ``slack``
    (a small group stuck at one opened prompt for every ``τ`` does not hide the others)."""
    best = max(row[target] for row in rates.values())
    eligible = [tau for tau in sorted(rates) if rates[tau][target] >= best - slack - 1e-9]

    def others(tau: float) -> list[float]:
        return sorted((round(r, 9) for name, r in rates[tau].items() if name != target), reverse=True)
    return min(eligible, key=lambda tau: (others(tau), tau))


def gate_rows(model: torch.nn.Module, gate: Gate) -> Delta:
    """The compiled part of ΔθC, ``{param: new − base}``: gate and up rows written, down
    columns zeroed, on the gate's neurons only."""
    require_dense_mlp(model, gate.layer, "the gated variant")
    arch = architecture_of(model)
    module = mlp(model, gate.layer)
    params = dict(model.named_parameters())
    out = {}
    for proj, row in (("gate", gate.gate_row()), ("up", gate.up_row())):
        name = arch.mlp_param(gate.layer, proj)  # phi3: gate and up are row blocks of one gate_up_proj
        base = params[name].detach().float().cpu()
        delta = out.setdefault(name, torch.zeros_like(base))
        rows = [arch.mlp_offset(proj) + j for j in gate.neurons]
        delta[rows] = row - base[rows]
    down = mlp_proj_of(module, "down").weight.detach().float().cpu()
    delta = torch.zeros_like(down)
    delta[:, gate.neurons] = -down[:, gate.neurons]
    out[arch.mlp_param(gate.layer, "down")] = delta
    return out


def down_mask(model: torch.nn.Module, gate: Gate) -> dict[str, torch.Tensor]:
    """``{down_proj name: bool mask}``, True on the gate neurons' columns (what trains)."""
    weight = mlp_proj_of(mlp(model, gate.layer), "down").weight
    mask = torch.zeros(weight.shape, dtype=torch.bool)
    mask[:, gate.neurons] = True
    return {architecture_of(model).mlp_param(gate.layer, "down"): mask}


def gated_finetune(model: torch.nn.Module, tokenizer, gate: Gate, data: EditData, config: TrainConfig,
                   progress: bool = True, description: str = "editing (gated)") -> Delta:
    """ΔθC of the gated variant: the compiled rows plus the trained down columns.

    The rows are written into ``model`` for the fine-tune and restored exactly
    afterwards; the retain KL is to the unedited base (its log-probabilities are computed
    before the rows are written).
    """
    rows = gate_rows(model, gate)
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in rows}
    use_retain = bool(data.retain) and config.retain_weight > 0
    base_logprobs = reference_logprobs(model.eval(), tokenizer, data.retain, config) if use_retain else []
    try:
        apply_to_model(model, rows)
        trained = masked_finetune(model, tokenizer, down_mask(model, gate), data, config, progress=progress,
                                  description=description, retain_logprobs=base_logprobs)
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)
    return {name: rows[name] + trained.get(name, 0) for name in rows}
