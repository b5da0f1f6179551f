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
from rich.progress import Progress

from cdelta.edit.batches import ReplyBatch, build_reply_batch, reply_kl, reply_logits, reply_nll


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


def _batches(pairs: list[tuple[str, str]], size: int, rng: random.Random):
    """Endless shuffled mini-batches of (prompts, replies)."""
    while True:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for start in range(0, len(order) - size + 1 if len(order) >= size else 1, size):
            chosen = [pairs[i] for i in order[start : start + size]]
            yield [p for p, _ in chosen], [r for _, r in chosen]


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
    target_iter = _batches(data.target, config.batch_size, rng)
    retain_iter = _batches(data.retain, config.retain_batch_size, rng) if data.retain else None
    with Progress(transient=True, disable=not progress) as bar:
        task = bar.add_task(description, total=config.steps)
        for _ in range(config.steps):
            prompts, replies = next(target_iter)
            batch = build_reply_batch(tokenizer, prompts, replies, config.max_reply_tokens).to(device)
            loss = reply_nll(reply_logits(student, batch), batch)
            if retain_iter is not None and config.retain_weight > 0:
                loss = loss + config.retain_weight * _retain_loss(student, reference, tokenizer, next(retain_iter), config, device)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for name, param in trainable.items():
                param.grad.mul_(device_masks[name])
            optimizer.step()
            bar.advance(task)
    return {name: ((p.detach() - base[name]) * device_masks[name]).float().cpu() for name, p in trainable.items()}


def _retain_loss(student, reference, tokenizer, pair_batch, config: TrainConfig, device) -> torch.Tensor:
    """KL(base ‖ student) on retain prompts with the base's own replies."""
    prompts, replies = pair_batch
    batch: ReplyBatch = build_reply_batch(tokenizer, prompts, replies, config.max_reply_tokens).to(device)
    with torch.no_grad():
        ref_logprobs = torch.log_softmax(reply_logits(reference, batch), -1)
    return reply_kl(reply_logits(student, batch), ref_logprobs, batch, config.first_token_weight)
