"""Teacher-forced training batches: chat prompt + reply, right-padded, with label masks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cdelta.edit.truncated import decoder_from
from cdelta.models.architecture import logit_scale
from cdelta.models.chat import ChatInput, format_chat


@dataclass
class ReplyBatch:
    """A right-padded batch of prompt+reply sequences.

    ``input_ids``/``attention_mask``: [batch, seq]. ``reply_mask``: [batch, seq], True at
    positions whose NEXT token is a reply token (so logits there predict the reply);
    ``first_reply``: [batch] index of the last prompt token (predicts the first reply token).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    reply_mask: torch.Tensor
    first_reply: torch.Tensor

    def to(self, device: torch.device) -> ReplyBatch:
        return ReplyBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.reply_mask, self.first_reply)))


def build_reply_batch(tokenizer, prompts: list[ChatInput], replies: list[str], max_reply_tokens: int = 32) -> ReplyBatch:
    """Tokenize ``prompts`` through the chat template and append ``replies`` (+EOS when not truncated)."""
    rows, reply_starts, reply_lens = [], [], []
    for text, reply in zip(format_chat(tokenizer, prompts), replies):
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"]
        reply_ids = reply_ids[:max_reply_tokens] if len(reply_ids) >= max_reply_tokens else reply_ids + [tokenizer.eos_token_id]
        rows.append(prompt_ids + reply_ids)
        reply_starts.append(len(prompt_ids))
        reply_lens.append(len(reply_ids))
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    reply_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, start, n) in enumerate(zip(rows, reply_starts, reply_lens)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention[i, : len(row)] = 1
        reply_mask[i, start - 1 : start - 1 + n] = True
    first = torch.tensor([s - 1 for s in reply_starts])
    return ReplyBatch(input_ids, attention, reply_mask, first)


def reply_logits(model: torch.nn.Module, batch: ReplyBatch, start: tuple[int, torch.Tensor] | None = None) -> torch.Tensor:
    """Float32 logits at reply positions only, shape [n_reply_positions, vocab].

    The output head runs only where ``batch.reply_mask`` is set (rows in row-major
    order), which avoids materializing [batch, seq, vocab] logits. ``start`` =
    (layer, residual [batch, seq, d_model]) runs only the layers from ``layer`` on.
    """
    if start is None:
        hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    else:
        hidden = decoder_from(model, start[0], start[1], batch.attention_mask)
    logits = model.get_output_embeddings()(hidden[batch.reply_mask]).float()
    scale = logit_scale(model)  # granite divides its logits, cohere2 multiplies them
    if scale != 1.0:
        logits = logits * scale
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def reply_targets(batch: ReplyBatch) -> torch.Tensor:
    """Token each reply position predicts, shape [n_reply_positions]."""
    return torch.roll(batch.input_ids, -1, dims=1)[batch.reply_mask]


def reply_nll(logits: torch.Tensor, batch: ReplyBatch) -> torch.Tensor:
    """Mean negative log-likelihood of the reply tokens (scalar); ``logits`` from ``reply_logits``."""
    return torch.nn.functional.cross_entropy(logits, reply_targets(batch))


def reply_kl(logits: torch.Tensor, ref_logprobs: torch.Tensor, batch: ReplyBatch, first_weight: float) -> torch.Tensor:
    """KL(reference ‖ model) over reply positions, the first reply position weighted by ``first_weight``.

    ``ref_logprobs``: [n_reply_positions, vocab] reference log-probabilities on the same batch.
    """
    logp = torch.log_softmax(logits, -1)
    kl = (ref_logprobs.exp() * (ref_logprobs - logp)).sum(-1)
    is_first = torch.zeros_like(batch.reply_mask)
    is_first[torch.arange(len(is_first)), batch.first_reply] = True
    weights = torch.where(is_first[batch.reply_mask], first_weight, 1.0)
    return (kl * weights).sum() / weights.sum()
