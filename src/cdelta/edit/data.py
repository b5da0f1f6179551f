"""Training data for the edit: refusal or compliant replies for the target, base replies to retain.

``run_edit_data`` is the run's data step (its pairs cached in the run directory);
``refusal_edit_data`` is the same refusal recipe for ``cdelta.edit`` (the API) and the
selective-tuning baselines of ``cdelta compare``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from cdelta.data.builtin import refusal_replies
from cdelta.data.contexts import contextualize, harmless_requests
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.generation import generate
from cdelta.judge import Judge, judge_batch
from cdelta.models.chat import ChatInput, user_text
from cdelta.stages import prompts_digest, run_stage

if TYPE_CHECKING:
    from cdelta.config import RunConfig
    from cdelta.edit.train import EditData
    from cdelta.models.loading import LoadedModel

Log = Callable[[str], None]

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


DECISIVE_OPENINGS = ("I can't", "I won't", "I cannot", "I will not")
"""How a ``decisive`` refusal starts: its first two or three tokens already refuse."""


def refusal_pairs(prompts: PromptSet, category: str, seed: int = 0, openings: str = "any") -> list[Pair]:
    """(prompt, refusal reply) pairs; replies drawn deterministically from the category's and
    generic refusals (``openings = "decisive"``: only those starting with ``DECISIVE_OPENINGS``)."""
    replies = refusal_replies()
    pool = list(replies.get(category, [])) + list(replies["generic"])
    if openings == "decisive":
        pool = [reply for reply in pool if reply.startswith(DECISIVE_OPENINGS)]
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


RETAIN_REPLY_TOKENS = 16
"""Tokens of the base's own reply to each retain prompt."""
TARGET_REPLY_TOKENS = 24
"""Tokens of the base's own (or teacher's) reply to each target prompt."""
LIFT_TEACHER = "ablated base reply if judged compliant, else own base reply if judged compliant, else dropped"
"""How ``lift_replies`` picks each target prompt's learned reply (part of its stage key)."""


def edit_prompts(prompts: PromptSet, cfg: RunConfig, contexts: list[str] = ()) -> tuple[PromptSet, PromptSet]:
    """``(retain, target)``: ``retain_prompts`` and the target categories' train-split prompts,
    with copies in ``contexts`` (``in_contexts``, train instances): each target prompt in
    every context, each retain prompt in one drawn context (the retain replies are generated)."""
    retain = in_contexts(retain_prompts(prompts, cfg.category, cfg.retain_counts(), cfg.seed), prompts, list(contexts), "train",
                         cfg.seed, every=False)
    target = in_contexts(prompts.filter(split="train", category=cfg.category), prompts, list(contexts), "train", cfg.seed)
    return retain, target


def refusal_targets(target: PromptSet, categories: list[str], seed: int = 0, openings: str = "any") -> list[Pair]:
    """``refusal_pairs`` of each category's prompts of ``target``, category by category."""
    return sum((refusal_pairs(target.filter(category=c), c, seed, openings) for c in categories), [])


def refusal_edit_data(prompts: PromptSet, cfg: RunConfig, retain_replies: Teacher) -> EditData:
    """Refusal replies for the target's train prompts; ``retain_replies`` (e.g. the base's own
    replies, ``own_reply_pairs``) on the retain prompts. Plain prompts only (no contexts)."""
    from cdelta.edit.train import EditData

    retain, target = edit_prompts(prompts, cfg)
    return EditData(refusal_targets(target, cfg.category, cfg.seed, cfg.refusal_openings), retain_replies(retain))


def cached_pairs(run_dir: Path, name: str, key: dict, make: Callable[[], list], log: Log) -> list[Pair]:
    """(prompt, reply) pairs made once and stored as ``run_dir/name.json``."""
    from cdelta.io import atomic_write_json

    path = run_dir / f"{name}.json"

    def write() -> list:
        pairs = make()
        atomic_write_json(path, pairs)
        return pairs

    return run_stage(run_dir, name, key, [path.name], write, lambda: pairs_from_json(json.loads(path.read_text())), log)


def lift_replies(lm: LoadedModel, prompts: PromptSet, target: PromptSet, seed: int, judge: Judge, judge_name: str) -> list[Pair]:
    """Compliant replies for ``lift`` (``LIFT_TEACHER``): first the base's greedy replies with
    its refusal direction ablated, then, where the judge calls that a refusal, its plain reply.

    The direction is fitted on the train split (``fit_refusal_direction``); the ablated
    model is only a teacher: the edit itself stays inside the circuit.
    """
    from cdelta.directions import ablation_hooks, fit_refusal_direction
    from cdelta.errors import CdeltaError

    direction = fit_refusal_direction(lm, prompts, seed=seed, recipe="harmful-harmless")

    def ablated(subset: PromptSet) -> list[tuple[str, str]]:
        with ablation_hooks(lm.model, direction):
            return own_reply_pairs(lm.model, lm.tokenizer, subset, TARGET_REPLY_TOKENS)

    pairs = first_compliant(judge, target, [ablated, lambda subset: own_reply_pairs(lm.model, lm.tokenizer, subset, TARGET_REPLY_TOKENS)])
    if not pairs:
        raise CdeltaError(
            f"the judge ({judge_name}) calls every teacher reply to the {len(target)} target prompts a refusal: nothing to learn",
            "check the judge on a few replies (cdelta eval), or try the other judge (judge = \"marker\" or \"classifier\")",
        )
    return pairs


def run_edit_data(cfg: RunConfig, run_dir: Path, lm: LoadedModel, prompts: PromptSet, base_key: dict, judge: Judge,
                  log: Log) -> tuple[EditData, EditData | None]:
    """A run's edit data, each part cached in ``run_dir`` (``retain.json``, ``lift_target.json``,
    ``own_target.json``): the base's own replies to retain; refusal replies (``refuse``) or the
    ``LIFT_TEACHER``'s compliant ones (``lift``) to learn; for the contrastive and gated variants
    also the base's own replies to the target prompts (θ_neg's data, the gate's positives).
    Returns ``(data, contrast_data)``; ``contrast_data`` is None for the direct variant."""
    from cdelta.edit.train import EditData

    retain_set, target = edit_prompts(prompts, cfg, cfg.train_contexts)
    retain = cached_pairs(run_dir, "retain", {**base_key, "prompts": prompts_digest(retain_set)},
                          lambda: own_reply_pairs(lm.model, lm.tokenizer, retain_set, RETAIN_REPLY_TOKENS), log)
    target_key = {**base_key, "prompts": prompts_digest(target)}
    if cfg.direction == "refuse":
        learned = refusal_targets(target, cfg.category, cfg.seed, cfg.refusal_openings)
    else:
        lift_key = {**target_key, "teacher": LIFT_TEACHER, "judge": cfg.judge}
        learned = cached_pairs(run_dir, "lift_target", lift_key,
                               lambda: lift_replies(lm, prompts, target, cfg.seed, judge, cfg.judge), log)
    data = EditData(learned, retain)
    contrast_data = None
    if cfg.variant in ("contrastive", "gated"):
        own = cached_pairs(run_dir, "own_target", target_key,
                           lambda: own_reply_pairs(lm.model, lm.tokenizer, target, TARGET_REPLY_TOKENS), log)
        contrast_data = EditData(own, retain)
    return data, contrast_data
