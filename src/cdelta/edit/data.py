"""Training data for the edit: refusal or compliant replies for the target, base replies to retain."""

from __future__ import annotations

import random
from collections.abc import Callable

from cdelta.data.builtin import refusal_replies
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.generation import generate
from cdelta.judge import Judge, judge_batch


def refusal_pairs(prompts: PromptSet, category: str, seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, refusal reply) pairs; replies drawn deterministically from the category's and generic refusals."""
    replies = refusal_replies()
    pool = list(replies.get(category, [])) + list(replies["generic"])
    rng = random.Random(f"{seed}:{category}")
    return [(p.text, rng.choice(pool)) for p in prompts]


def retain_prompts(prompts: PromptSet, targets: list[str], per_kind: dict[str, int], seed: int = 0) -> PromptSet:
    """Train-split prompts the edit must leave alone.

    ``per_kind`` caps how many are drawn: keys ``harmless``, ``lookalike`` and
    ``other`` (per other harmful category). Categories in ``targets`` are excluded
    (with target ``lookalike``: no look-alikes, every harm category).
    """
    train = prompts.filter(split="train", exclude_category=targets)
    chosen = train.filter(kind=HARMLESS).sample(per_kind.get(HARMLESS, 0), seed).prompts
    chosen += train.filter(kind=LOOKALIKE).sample(per_kind.get(LOOKALIKE, 0), seed).prompts
    others = train.filter(kind="harmful")
    for category in others.categories():
        chosen += others.filter(category=category).sample(per_kind.get("other", 0), seed).prompts
    return PromptSet(f"{prompts.name}:retain", chosen)


def own_reply_pairs(model, tokenizer, prompts: PromptSet, max_new_tokens: int = 24, progress: bool = True) -> list[tuple[str, str]]:
    """(prompt, the model's own greedy reply) pairs."""
    replies = generate(model, tokenizer, prompts.texts(), max_new_tokens, batch_size=32, progress=progress, description="base replies")
    return list(zip(prompts.texts(), replies))


Teacher = Callable[[PromptSet], list[tuple[str, str]]]
"""Makes (prompt, reply) pairs for a prompt set, in its order (e.g. ``own_reply_pairs`` under hooks)."""


def first_compliant(judge: Judge, prompts: PromptSet, teachers: list[Teacher]) -> list[tuple[str, str]]:
    """Per prompt, the reply of the first teacher whose reply the judge finds compliant.

    Each teacher only sees the prompts every earlier teacher's reply refused; prompts
    that all teachers refuse are dropped. Returns (prompt, reply) pairs in prompt order.
    """
    chosen: dict[str, tuple[str, str]] = {}
    remaining = prompts
    for teacher in teachers:
        if not len(remaining):
            break
        pairs = teacher(remaining)
        refused = judge_batch(judge, [text for text, _ in pairs], [reply for _, reply in pairs])
        chosen.update({p.id: pair for p, pair, is_refusal in zip(remaining, pairs, refused) if not is_refusal})
        remaining = PromptSet(remaining.name, [p for p in remaining if p.id not in chosen])
    return [chosen[p.id] for p in prompts if p.id in chosen]
