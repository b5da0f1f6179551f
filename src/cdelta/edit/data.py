"""Training data for the edit: refusal or compliant replies for the target, base replies to retain."""

from __future__ import annotations

import random
from collections.abc import Callable

from cdelta.data.builtin import refusal_replies
from cdelta.data.contexts import contextualize, harmless_requests
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.generation import generate
from cdelta.judge import Judge, judge_batch
from cdelta.models.chat import ChatInput, user_text

DOMAIN = "domain"
"""Source name of the domain look-alikes (``data.builtin.load_domain``)."""

Pair = tuple[ChatInput, str]
"""A (prompt, reply) training pair; the prompt is a ``Prompt.chat``."""


def pairs_from_json(rows: list) -> list[Pair]:
    """Pairs read back from JSON (a conversation's messages come back as lists)."""
    return [(prompt if isinstance(prompt, str) else tuple(tuple(m) for m in prompt), reply) for prompt, reply in rows]


def in_contexts(chosen: PromptSet, prompts: PromptSet, contexts: list[str], split: str = "train", seed: int = 0,
                every: bool = True) -> PromptSet:
    """``chosen`` followed by copies of it in ``contexts``, with context instances from the
    library's ``split`` (same-turn conversations put a harmless request of ``prompts``' same
    split first): training uses train instances, selection val ones. ``every``: one copy
    per context; else one copy per prompt, in the context a seeded hash of its id draws
    (the same mix of contexts at 1/len(contexts) of the cost)."""
    if not contexts:
        return chosen
    harmless = harmless_requests(prompts, split)
    if every:
        groups = {context: chosen for context in contexts}
    else:
        drawn = {context: [] for context in contexts}
        for prompt in chosen:
            drawn[contexts[random.Random(f"{seed}:context:{prompt.id}").randrange(len(contexts))]].append(prompt)
        groups = {context: PromptSet(chosen.name, members) for context, members in drawn.items()}
    out = chosen
    for context, members in groups.items():
        out = out + contextualize(members, context, split, seed, harmless)
    return PromptSet(chosen.name, out.prompts)


def refusal_pairs(prompts: PromptSet, category: str, seed: int = 0) -> list[Pair]:
    """(prompt, refusal reply) pairs; replies drawn deterministically from the category's and generic refusals."""
    replies = refusal_replies()
    pool = list(replies.get(category, [])) + list(replies["generic"])
    rng = random.Random(f"{seed}:{category}")
    return [(p.chat, rng.choice(pool)) for p in prompts]


def retain_prompts(prompts: PromptSet, targets: list[str], per_kind: dict[str, int], seed: int = 0) -> PromptSet:
    """Train-split prompts the edit must leave alone.

    ``per_kind`` caps how many are drawn: keys ``harmless``, ``lookalike`` and
    ``other`` (per other harmful category); domain look-alikes (source ``domain``: the
    target's own field) are all kept. Categories in ``targets`` are excluded
    (with target ``lookalike``: no look-alikes, every harm category).
    """
    train = prompts.filter(split="train", exclude_category=targets)
    lookalikes = train.filter(kind=LOOKALIKE)
    chosen = train.filter(kind=HARMLESS).sample(per_kind.get(HARMLESS, 0), seed).prompts
    chosen += PromptSet(lookalikes.name, [p for p in lookalikes if p.source != DOMAIN]).sample(per_kind.get(LOOKALIKE, 0), seed).prompts
    chosen += [p for p in lookalikes if p.source == DOMAIN]
    others = train.filter(kind="harmful")
    for category in others.categories():
        chosen += others.filter(category=category).sample(per_kind.get("other", 0), seed).prompts
    return PromptSet(f"{prompts.name}:retain", chosen)


def own_reply_pairs(model, tokenizer, prompts: PromptSet, max_new_tokens: int = 24, progress: bool = True) -> list[Pair]:
    """(prompt, the model's own greedy reply) pairs."""
    replies = generate(model, tokenizer, prompts.chats(), max_new_tokens, batch_size=32, progress=progress, description="base replies")
    return list(zip(prompts.chats(), replies))


Teacher = Callable[[PromptSet], list[Pair]]
"""Makes (prompt, reply) pairs for a prompt set, in its order (e.g. ``own_reply_pairs`` under hooks)."""


def first_compliant(judge: Judge, prompts: PromptSet, teachers: list[Teacher]) -> list[Pair]:
    """Per prompt, the reply of the first teacher whose reply the judge finds compliant.

    Each teacher only sees the prompts every earlier teacher's reply refused; prompts
    that all teachers refuse are dropped. Returns (prompt, reply) pairs in prompt order.
    """
    chosen: dict[str, Pair] = {}
    remaining = prompts
    for teacher in teachers:
        if not len(remaining):
            break
        pairs = teacher(remaining)
        refused = judge_batch(judge, [user_text(prompt) for prompt, _ in pairs], [reply for _, reply in pairs])
        chosen.update({p.id: pair for p, pair, is_refusal in zip(remaining, pairs, refused) if not is_refusal})
        remaining = PromptSet(remaining.name, [p for p in remaining if p.id not in chosen])
    return [chosen[p.id] for p in prompts if p.id in chosen]
