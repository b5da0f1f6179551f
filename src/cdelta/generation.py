"""Batched, deterministic greedy generation through the model's chat template."""

from __future__ import annotations

import torch
from cdelta.ui import progress_bar

from cdelta.models.chat import encode_chat


def generate(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
    description: str = "generating",
) -> list[str]:
    """Greedy completions for ``prompts``, returned in input order.

    Prompts are batched by tokenized length (left padding) to reduce padding;
    decoding stops at EOS or after ``max_new_tokens`` new tokens.
    """
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    completions: list[str] = [""] * len(prompts)
    with progress_bar(progress) as bar:
        task = bar.add_task(description, total=len(prompts))
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            batch = encode_chat(tokenizer, [prompts[i] for i in index], device)
            with torch.no_grad():
                out = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                    pad_token_id=tokenizer.pad_token_id,
                )
            new_tokens = out[:, batch["input_ids"].shape[1] :]
            for i, text in zip(index, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                completions[i] = text.strip()
            bar.advance(task, len(index))
    return completions
