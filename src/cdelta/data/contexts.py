"""Deployment contexts: the same request as deployed models see it.

A prompt's *context* is what surrounds its request in the conversation: the messages
before the last user turn (a system prompt, earlier exchanges) and the request's own
wording. Every context instance comes from a project-written library with fixed
train/val/test splits (``data/builtin/system_prompts.jsonl``, ``histories.jsonl``,
``framings.jsonl``), so training draws only train instances and tests only test ones.

Named contexts (``CONTEXTS``):

* ``plain``: one user turn under the model's default system prompt (no change);
* ``system``: a system prompt from the library (short, long, persona, customer support,
  coding, tool use, non-English, formatting instructions);
* ``conversation``: the request as the 2nd, 3rd or 4th user turn after benign
  exchanges, or after an unrelated harmless request in the same turn;
* ``rephrased``: the request in another framing (fiction, role play, "my friend wants
  to know", hypothetical, polite, terse, lower case with typos, ...);
* ``sampled``: the plain prompt, decoded by sampling (``SAMPLING``) instead of greedily.

Each prompt draws its instance by a seeded hash of its id, so a context is a
deterministic function of (prompt set, split, seed).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib.resources import files

from cdelta.data.prompts import HARMLESS, SPLITS, Prompt, PromptSet
from cdelta.errors import CdeltaError

PLAIN, SYSTEM, CONVERSATION, REPHRASED, SAMPLED = "plain", "system", "conversation", "rephrased", "sampled"
CONTEXTS = (PLAIN, SYSTEM, CONVERSATION, REPHRASED, SAMPLED)
"""Every named context, in report order."""
PROMPT_CONTEXTS = (SYSTEM, CONVERSATION, REPHRASED)
"""Contexts that change the conversation (the others change only decoding)."""
SAME_TURN = "same-turn"
"""The conversation variant with an unrelated harmless request before the target in one turn."""


@dataclass(frozen=True)
class Sampling:
    """Sampled decoding: one run per (temperature, seed), ``top_p`` nucleus."""

    temperatures: tuple[float, ...] = (0.7, 1.0)
    top_p: float = 0.9
    seeds: tuple[int, ...] = (0, 1, 2)


SAMPLING = Sampling()

_BUILTIN = files("cdelta.data") / "builtin"


@lru_cache(maxsize=None)
def library(name: str) -> tuple[dict, ...]:
    """Rows of one packaged context library (``system_prompts``, ``histories``, ``framings``)."""
    text = (_BUILTIN / f"{name}.jsonl").read_text(encoding="utf-8")
    return tuple(json.loads(line) for line in text.splitlines() if line.strip())


def instances(name: str, split: str) -> list[dict]:
    """The library rows of one split."""
    if split not in SPLITS:
        raise CdeltaError(f"unknown split {split!r} for context library {name}", f"use one of {', '.join(SPLITS)}")
    return [row for row in library(name) if row["split"] == split]


def _rng(seed: int, context: str, prompt_id: str) -> random.Random:
    """A generator seeded by (seed, context, prompt id): one prompt's draws."""
    return random.Random(hashlib.sha256(f"{seed}:{context}:{prompt_id}".encode()).digest())


def with_system(prompt: Prompt, rng: random.Random, split: str) -> Prompt:
    """``prompt`` under one system prompt of ``split``."""
    row = rng.choice(instances("system_prompts", split))
    return replace(prompt, id=f"{prompt.id}@{row['id']}", context=(("system", row["text"]),))


def in_conversation(prompt: Prompt, rng: random.Random, split: str, harmless: list[str]) -> Prompt:
    """``prompt`` as the 2nd–4th user turn after benign exchanges of ``split`` (three in
    four prompts), or after an unrelated harmless request from ``harmless`` in its own turn."""
    turns = rng.randint(1, 4)
    if turns == 4 and harmless:
        other = rng.choice(harmless)
        return replace(prompt, id=f"{prompt.id}@{SAME_TURN}", text=f"{other} Also, {prompt.text[0].lower()}{prompt.text[1:]}")
    rows = rng.sample(instances("histories", split), min(turns, 3))
    history = tuple(message for row in rows for message in (("user", row["user"]), ("assistant", row["assistant"])))
    return replace(prompt, id=f"{prompt.id}@" + "+".join(row["id"] for row in rows), context=history)


def noisy(text: str, rng: random.Random, rate: float = 0.12) -> str:
    """Lower case, no final punctuation, and adjacent letters swapped in about ``rate`` of
    the words of four or more letters (a hurried typist)."""
    words = text.lower().rstrip(".?!").split()
    for i, word in enumerate(words):
        if len(word) >= 4 and word.isalpha() and rng.random() < rate:
            j = rng.randrange(len(word) - 1)
            words[i] = word[:j] + word[j + 1] + word[j] + word[j + 2 :]
    return " ".join(words)


def rephrase(prompt: Prompt, rng: random.Random, split: str) -> Prompt:
    """``prompt`` in one framing of ``split`` (its request wrapped or rewritten)."""
    row = rng.choice(instances("framings", split))
    template = row["template"]
    if template.startswith("noisy:"):
        text = noisy(prompt.text, rng)
    else:
        request = prompt.text if template.startswith("{request}") else prompt.text[0].lower() + prompt.text[1:]
        text = template.format(request=request)
    return replace(prompt, id=f"{prompt.id}@{row['id']}", text=text)


def contextualize(prompts: PromptSet, context: str, split: str, seed: int = 0, harmless: list[str] | None = None) -> PromptSet:
    """``prompts`` in ``context``, each with an instance of the library's ``split`` drawn by
    a seeded hash of its id; ``harmless`` are the requests a same-turn conversation puts
    first (none: that variant is not drawn). ``plain`` and ``sampled`` return ``prompts``."""
    if context in (PLAIN, SAMPLED):
        return prompts
    if context not in PROMPT_CONTEXTS:
        raise CdeltaError(f"unknown context {context!r}", f"use one or more of {', '.join(CONTEXTS)}")
    out = []
    for prompt in prompts:
        rng = _rng(seed, context, prompt.id)
        if context == SYSTEM:
            out.append(with_system(prompt, rng, split))
        elif context == CONVERSATION:
            out.append(in_conversation(prompt, rng, split, [t for t in (harmless or []) if t != prompt.text]))
        else:
            out.append(rephrase(prompt, rng, split))
    return PromptSet(prompts.name, out)


def harmless_requests(prompts: PromptSet, split: str) -> list[str]:
    """The harmless prompts of ``split``: what a same-turn conversation may ask first."""
    return prompts.filter(split=split, kind=HARMLESS).texts()


def parse_contexts(names: list[str]) -> list[str]:
    """Validated context names in report order (``all``: every context; plain always first)."""
    wanted = set(CONTEXTS) if "all" in names else set(names)
    unknown = wanted - set(CONTEXTS)
    if unknown:
        raise CdeltaError(f"unknown context {', '.join(sorted(unknown))}", f"use one or more of {', '.join(CONTEXTS)}, or all")
    return [c for c in CONTEXTS if c in wanted | {PLAIN}]
