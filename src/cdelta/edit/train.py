"""Circuit-restricted fine-tuning: gradients flow only into the circuit's parameter slices.

Only parameters with a non-empty mask are trainable; their gradients are multiplied
by the boolean mask after every backward pass, so AdamW (no weight decay) leaves every
entry outside the mask exactly at its base value.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import torch
from cdelta.ui import progress_bar

from cdelta.edit.batches import ReplyBatch, build_reply_batch, reply_kl, reply_logits, reply_nll
from cdelta.edit.truncated import lowest_layer, residual_at
from cdelta.models.architecture import architecture_of


@dataclass
class TrainConfig:
    """Hyper-parameters of one masked fine-tune.

    ``retain_weight`` scales the KL-to-base retain loss; ``first_token_weight`` is the
    weight of the first reply position inside that KL (the refuse-or-answer decision).
    """

    steps: int = 60
    lr: float = 1e-4
    batch_size: int = 8
    retain_batch_size: int = 16
    retain_weight: float = 1.0
    first_token_weight: float = 10.0
    max_reply_tokens: int = 24
    seed: int = 0


@dataclass
class EditData:
    """What the fine-tune learns from.

    ``target``: (prompt, reply) pairs to learn; ``retain``: (prompt, base reply) pairs
    on which the edited model must keep the base's distribution.
    """

    target: list[tuple[str, str]]
    retain: list[tuple[str, str]]


def _index_batches(n: int, size: int, rng: random.Random):
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


def masked_finetune(
    model: torch.nn.Module,
    tokenizer,
    masks: dict[str, torch.Tensor],
    data: EditData,
    config: TrainConfig,
    reference: torch.nn.Module | None = None,
    progress: bool = True,
    description: str = "editing",
) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of ``model`` on ``masks`` and return the masked weight change.

    Returns ``{param_name: delta}`` with ``delta = (θ_trained − θ_base) ⊙ mask`` (float32,
    zero outside the mask) for every masked parameter. ``model`` itself is unchanged.
    ``reference`` (default: ``model``) supplies the retain-KL targets.
    """
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    student = copy.deepcopy(model).train()
    reference = (reference or model).eval()
    device = next(student.parameters()).device
    params = dict(student.named_parameters())
    trainable = {name: params[name] for name, mask in masks.items() if mask.any()}
    for param in student.parameters():
        param.requires_grad_(False)
    for param in trainable.values():
        param.requires_grad_(True)
    base = {name: p.detach().clone() for name, p in trainable.items()}
    device_masks = {name: masks[name].to(device) for name in trainable}
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config.lr, weight_decay=0.0)
    use_retain = bool(data.retain) and config.retain_weight > 0
    ref_logprobs = reference_logprobs(reference, tokenizer, data.retain, config) if use_retain else []
    layer = lowest_layer(list(trainable), architecture_of(student).layers_prefix) or 0
    target_cache = residual_cache(student, tokenizer, data.target, layer, config)
    retain_cache = residual_cache(student, tokenizer, data.retain, layer, config) if use_retain else []
    target_iter = _index_batches(len(data.target), config.batch_size, rng)
    retain_iter = _index_batches(len(data.retain), config.retain_batch_size, rng) if use_retain else None
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=config.steps)
        for _ in range(config.steps):
            index = next(target_iter)
            batch = _batch(tokenizer, [data.target[i] for i in index], config, device)
            loss = reply_nll(reply_logits(student, batch, _start(layer, target_cache, index, batch)), batch)
            if retain_iter is not None:
                index = next(retain_iter)
                batch = _batch(tokenizer, [data.retain[i] for i in index], config, device)
                ref = torch.cat([ref_logprobs[i] for i in index]).to(device).float()
                logits = reply_logits(student, batch, _start(layer, retain_cache, index, batch))
                loss = loss + config.retain_weight * reply_kl(logits, ref, batch, config.first_token_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for name, param in trainable.items():
                param.grad.mul_(device_masks[name])
            optimizer.step()
            bar.advance(task)
    return {name: ((p.detach() - base[name]) * device_masks[name]).float().cpu() for name, p in trainable.items()}


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
