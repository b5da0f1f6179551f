"""Chat-template formatting, left-padded batch encoding, and the logits where a reply starts."""

from __future__ import annotations

from collections.abc import Callable

import torch
from jinja2 import TemplateError


ChatInput = str | tuple[tuple[str, str], ...]
"""One prompt: a user message alone (under the model's default system prompt), or a
conversation as (role, content) messages ending in the user's turn (``Prompt.chat``)."""


def messages_of(prompt: ChatInput) -> list[dict[str, str]]:
    """The chat template's message list for one prompt."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": role, "content": content} for role, content in prompt]


def user_text(prompt: ChatInput) -> str:
    """The request itself: the text of the prompt's last user turn."""
    return prompt if isinstance(prompt, str) else next(content for role, content in reversed(prompt) if role == "user")


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Messages without a system role, its text prepended to the first user turn (for
    templates, such as Gemma's, that reject a system message)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if system:
        rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def uses_thinking(tokenizer) -> bool:
    """Whether the tokenizer's chat template reads ``enable_thinking`` (qwen3 and the like)."""
    template = getattr(tokenizer, "chat_template", None)
    texts = template.values() if isinstance(template, dict) else [template or ""]
    return any("enable_thinking" in text for text in texts)


def render(tokenizer, prompt: ChatInput, enable_thinking: bool | None = None) -> str:
    """One prompt through the chat template, ready for the reply.

    ``enable_thinking`` is passed to templates that read it (``uses_thinking``): False asks a
    thinking model to answer without its reasoning block, True to reason first; None (the
    default) and templates without the switch render as the template does by default.
    """
    messages = messages_of(prompt)
    extra = {"enable_thinking": enable_thinking} if enable_thinking is not None and uses_thinking(tokenizer) else {}
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
    except TemplateError:  # raised by templates that reject a system role
        if not any(m["role"] == "system" for m in messages):
            raise
        return tokenizer.apply_chat_template(fold_system(messages), tokenize=False, add_generation_prompt=True, **extra)


def format_chat(tokenizer, prompts: list[ChatInput], enable_thinking: bool | None = None) -> list[str]:
    """Render prompts through the tokenizer's chat template, ready for the reply."""
    return [render(tokenizer, prompt, enable_thinking) for prompt in prompts]


def encode_chat(tokenizer, prompts: list[ChatInput], device: torch.device | str = "cpu",
                enable_thinking: bool | None = None) -> dict[str, torch.Tensor]:
    """Left-padded ``input_ids`` and ``attention_mask``, shape [batch, seq].

    The last position of every row is the last prompt token (left padding), so
    position -1 is where the model decides how to start its reply.
    """
    tokenizer.padding_side = "left"
    batch = tokenizer(format_chat(tokenizer, prompts, enable_thinking), return_tensors="pt", padding=True, add_special_tokens=False)
    return {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}


@torch.no_grad()
def reply_start_logits(model: torch.nn.Module, tokenizer, prompts: list[ChatInput], batch_size: int = 16,
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
