"""Chat-template formatting, left-padded batch encoding, and the logits where a reply starts."""

from __future__ import annotations

from collections.abc import Callable

import torch


def format_chat(tokenizer, prompts: list[str], system: str | None = None) -> list[str]:
    """Render user prompts through the tokenizer's chat template, ready for the reply."""
    rendered = []
    for prompt in prompts:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        rendered.append(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return rendered


def encode_chat(tokenizer, prompts: list[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, shape [batch, seq].

    The last position of every row is the last prompt token (left padding), so
    position -1 is where the model decides how to start its reply.
    """
    tokenizer.padding_side = "left"
    batch = tokenizer(format_chat(tokenizer, prompts), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def reply_start_logits(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16,
                       on_batch: Callable[[], None] | None = None) -> torch.Tensor:
    """Logits at the last prompt token (they predict the first reply token): [n_prompts, vocab]
    on the CPU, float32 (float64 for a float64 model). ``on_batch`` is called after each batch."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(prompts), batch_size):
        logits = model(**encode_chat(tokenizer, prompts[start : start + batch_size], device), logits_to_keep=1).logits[:, -1]
        rows.append((logits if logits.dtype == torch.float64 else logits.float()).cpu())
        if on_batch:
            on_batch()
    return torch.cat(rows)
