"""Chat-template formatting and left-padded batch encoding."""

from __future__ import annotations

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
