"""Circuit-restricted fine-tuning: only the circuit's weight entries are trained.

The masked entries of every touched parameter live in a separate trainable vector
(``CircuitSlices``), float32 even when the model is bfloat16/float16 (master weights);
each step scatters them into the model's frozen weights and runs the model through
``torch.func.functional_call``. Gradients and AdamW state therefore exist only for the
masked entries: optimizer memory is 16 bytes per circuit entry (value, gradient, two
moments), whatever the model's size. The model itself is never copied nor changed.

For a float32 model this is numerically the same as training whole tensors and
multiplying their gradients by the mask (entries outside the mask then get zero
gradient, zero moments and an exactly zero AdamW step): the same seed gives
byte-identical deltas.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.func import functional_call

from cdelta.circuits.attribution import frozen
from cdelta.config import DEFAULT_LR, RunConfig, default_of
from cdelta.edit.batches import ReplyBatch, build_reply_batch, reply_kl, reply_logits, reply_nll
from cdelta.edit.truncated import lowest_layer, residual_at
from cdelta.models.architecture import architecture_of
from cdelta.models.chat import ChatInput
from cdelta.ui import progress_bar


@dataclass
class TrainConfig:
    """Hyper-parameters of one masked fine-tune.

    ``retain_weight`` scales the KL-to-base retain loss; ``first_token_weight`` is the
    weight of the first reply position inside that KL (the refuse-or-answer decision).
    Defaults are ``RunConfig``'s (``lr``: ``DEFAULT_LR``, the direct variant's); a run
    builds its own with ``train_config``.
    """

    steps: int = default_of("steps")
    lr: float = DEFAULT_LR
    batch_size: int = default_of("batch_size")
    retain_batch_size: int = 16
    retain_weight: float = default_of("retain_weight")
    first_token_weight: float = default_of("first_token_weight")
    max_reply_tokens: int = 24
    seed: int = default_of("seed")


def train_config(cfg: RunConfig) -> TrainConfig:
    """The masked fine-tune's settings of run ``cfg``."""
    return TrainConfig(steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, retain_weight=cfg.retain_weight,
                       first_token_weight=cfg.first_token_weight, seed=cfg.seed)


@dataclass
class EditData:
    """What the fine-tune learns from.

    ``target``: (prompt, reply) pairs to learn; ``retain``: (prompt, base reply) pairs
    on which the edited model must keep the base's distribution.
    """

    target: list[tuple[ChatInput, str]]
    retain: list[tuple[ChatInput, str]]


def index_batches(n: int, size: int, rng: random.Random):
    """Endless shuffled mini-batches of indices into a list of length ``n``."""
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for start in range(0, max(1, n - size + 1), size):
            yield order[start : start + size]


@torch.no_grad()
def reference_logprobs(reference: torch.nn.Module, tokenizer, pairs: list[tuple[str, str]], config: TrainConfig) -> list[torch.Tensor]:
    """Per retain example, the reference's log-probabilities at its reply positions.

    Each entry has shape [n_reply_positions_i, vocab] (bfloat16 to halve memory); the
    reference never changes during training, so this runs once instead of every step.
    """
    device = next(reference.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), config.retain_batch_size):
        chunk = pairs[start : start + config.retain_batch_size]
        batch = build_reply_batch(tokenizer, [p for p, _ in chunk], [r for _, r in chunk], config.max_reply_tokens).to(device)
        logprobs = torch.log_softmax(reply_logits(reference, batch), -1).to(torch.bfloat16).cpu()
        out += list(logprobs.split(batch.reply_mask.sum(1).tolist()))
    return out


class CircuitSlices(torch.nn.Module):
    """Trainable copies of a model's masked weight entries, apart from the frozen weights.

    ``values[i]`` is a float32 vector ``[n_i]`` holding the entries of parameter
    ``names[i]`` where its mask is True (row-major order); ``base`` are the model's own
    parameter tensors (not copied), each on its own device (``device_map`` models work).
    """

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
        super().__init__()
        params = dict(model.named_parameters())
        self.names = [name for name, mask in masks.items() if mask.any()]
        self.base = {name: params[name].detach() for name in self.names}
        self.masks = {name: masks[name].to(self.base[name].device) for name in self.names}
        self.values = torch.nn.ParameterList(
            [torch.nn.Parameter(self.base[name][self.masks[name]].float()) for name in self.names]
        )

    def weights(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """``{prefix + name: weight}``: the frozen weight with the current values scattered in (model dtype)."""
        return {
            prefix + name: self.base[name].masked_scatter(self.masks[name], value.to(self.base[name].dtype))
            for name, value in zip(self.names, self.values)
        }

    @torch.no_grad()
    def deltas(self) -> dict[str, torch.Tensor]:
        """``{name: θ_trained − θ_base}``: dense float32 on CPU, zero outside the mask."""
        out = {}
        for name, value in zip(self.names, self.values):
            base, mask = self.base[name], self.masks[name]
            delta = torch.zeros(base.shape, dtype=torch.float32)
            delta[mask.cpu()] = (value - base[mask].float()).cpu()
            out[name] = delta
        return out


class _ReplyLogits(torch.nn.Module):
    """``reply_logits`` as a module, so ``functional_call`` can swap in the edited weights."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: ReplyBatch, start: tuple[int, torch.Tensor] | None) -> torch.Tensor:
        return reply_logits(self.model, batch, start)


@contextmanager
def _training(model: torch.nn.Module):
    """``model.train()`` inside the block, the previous mode afterwards."""
    was_training = model.training
    model.train()
    try:
        yield
    finally:
        model.train(was_training)


def masked_finetune(
    model: torch.nn.Module,
    tokenizer,
    masks: dict[str, torch.Tensor],
    data: EditData,
    config: TrainConfig,
    reference: torch.nn.Module | None = None,
    progress: bool = True,
    description: str = "editing",
    retain_logprobs: list[torch.Tensor] | None = None,
    grad_clip: float | None = None,
) -> dict[str, torch.Tensor]:
    """Fine-tune ``model``'s masked entries and return the weight change.

    Returns ``{param_name: delta}`` with ``delta = θ_trained − θ_base`` (float32 on CPU,
    zero outside the mask) for every parameter with a non-empty mask. ``model`` itself is
    unchanged. ``reference`` (default: ``model``) supplies the retain-KL targets, unless
    ``retain_logprobs`` gives them already (``reference_logprobs`` of ``data.retain``).
    ``grad_clip`` clips the gradient of the trained entries to that global L2 norm before
    every step (None, as ``cdelta run`` trains: no clipping).
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    reference = (reference or model).eval()
    device = next(model.parameters()).device
    use_retain = bool(data.retain) and config.retain_weight > 0
    if retain_logprobs is None:
        retain_logprobs = reference_logprobs(reference, tokenizer, data.retain, config) if use_retain else []
    slices = CircuitSlices(model, masks)
    objective = _ReplyLogits(model)
    optimizer = torch.optim.AdamW(list(slices.values), lr=config.lr, weight_decay=0.0)
    layer = lowest_layer(slices.names, architecture_of(model).layers_prefix) or 0
    target_cache = residual_cache(model, tokenizer, data.target, layer, config)
    retain_cache = residual_cache(model, tokenizer, data.retain, layer, config) if use_retain else []
    target_iter = index_batches(len(data.target), config.batch_size, rng)
    retain_iter = index_batches(len(data.retain), config.retain_batch_size, rng) if use_retain else None
    with frozen(model), _training(model), progress_bar(progress) as bar:
        task = bar.add_task(description, total=config.steps)
        for _ in range(config.steps):
            weights = slices.weights(prefix="model.")
            index = next(target_iter)
            batch = _batch(tokenizer, [data.target[i] for i in index], config, device)
            logits = functional_call(objective, weights, (batch, _start(layer, target_cache, index, batch)))
            loss = reply_nll(logits, batch)
            if retain_iter is not None:
                index = next(retain_iter)
                batch = _batch(tokenizer, [data.retain[i] for i in index], config, device)
                ref = torch.cat([retain_logprobs[i] for i in index]).to(device).float()
                logits = functional_call(objective, weights, (batch, _start(layer, retain_cache, index, batch)))
                loss = loss + config.retain_weight * reply_kl(logits, ref, batch, config.first_token_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(list(slices.values), grad_clip)
            optimizer.step()
            bar.advance(task)
    return slices.deltas()


def _batch(tokenizer, pairs: list[tuple[str, str]], config: TrainConfig, device) -> ReplyBatch:
    return build_reply_batch(tokenizer, [p for p, _ in pairs], [r for _, r in pairs], config.max_reply_tokens).to(device)


@torch.no_grad()
def residual_cache(model, tokenizer, pairs: list[tuple[str, str]], layer: int, config: TrainConfig) -> list[torch.Tensor]:
    """Per example, the residual stream [seq_i, d_model] entering ``layer`` (empty when layer is 0)."""
    if layer == 0:
        return []
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(pairs), config.retain_batch_size):
        batch = _batch(tokenizer, pairs[start : start + config.retain_batch_size], config, device)
        residual = residual_at(model, layer, batch.input_ids, batch.attention_mask)
        out += [row[: int(n)] for row, n in zip(residual, batch.attention_mask.sum(1))]
    return out


def _start(layer: int, cache: list[torch.Tensor], index: list[int], batch: ReplyBatch) -> tuple[int, torch.Tensor] | None:
    """(layer, right-padded cached residual [batch, seq, d_model]) for ``reply_logits``, or None."""
    if layer == 0:
        return None
    rows = [cache[i] for i in index]
    residual = rows[0].new_zeros(len(rows), batch.input_ids.shape[1], rows[0].shape[-1])
    for i, row in enumerate(rows):
        residual[i, : len(row)] = row
    return layer, residual
