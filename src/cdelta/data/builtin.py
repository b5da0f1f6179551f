"""The project's own prompt set, shipped inside the package (see data/builtin/)."""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files

from cdelta.data.prompts import HARM_CATEGORIES, HARMLESS, LOOKALIKE, TWIN, Prompt, PromptSet, assign_split

_BUILTIN = files("cdelta.data") / "builtin"


def _read_jsonl(name: str) -> list[dict]:
    """Rows of one packaged JSONL file."""
    text = (_BUILTIN / name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


@lru_cache(maxsize=4)
def load_builtin(split_seed: int = 0) -> PromptSet:
    """All project prompts: six harm categories, harmless, and benign look-alikes.

    Splits are fixed by a seeded hash of each prompt id (``assign_split``).
    Look-alikes keep the harm category they resemble in ``source_category``.
    """
    prompts: list[Prompt] = []
    for category in HARM_CATEGORIES:
        prompts += [
            Prompt(r["id"], r["text"], category, "harmful", "builtin", assign_split(r["id"], split_seed), category)
            for r in _read_jsonl(f"{category}.jsonl")
        ]
    prompts += [
        Prompt(r["id"], r["text"], HARMLESS, HARMLESS, "builtin", assign_split(r["id"], split_seed), HARMLESS)
        for r in _read_jsonl("harmless.jsonl")
    ]
    prompts += [
        Prompt(r["id"], r["text"], LOOKALIKE, LOOKALIKE, "builtin", assign_split(r["id"], split_seed), r.get("near", ""))
        for r in _read_jsonl("lookalike.jsonl")
    ]
    return PromptSet("builtin", prompts)


@lru_cache(maxsize=4)
def load_twins(split_seed: int = 0) -> PromptSet:
    """The harmful twin of every builtin look-alike: the same sentence minimally changed
    into a request to refuse ("How do I kill a Python process…" → "How do I kill my
    neighbour's dog…"), as XSTest pairs its safe prompts with unsafe contrasts.

    Category ``twin``, kind harmful, ``source_category`` the harm category the twin asks
    for; each twin takes its look-alike's split (``assign_split`` of the look-alike's id),
    so a pair is never split between training and test.
    """
    return PromptSet("twins", [
        Prompt(r["id"], r["text"], TWIN, "harmful", "builtin", assign_split(r["of"], split_seed), r["category"])
        for r in _read_jsonl("twins.jsonl")
    ])


@lru_cache(maxsize=4)
def load_pairs(split_seed: int = 0) -> PromptSet:
    """Project-written over-refusal minimal pairs (``pairs.jsonl``): a benign look-alike and
    the same sentence minimally changed into a request to refuse, for ten kinds of
    look-alike (homonyms, figurative language, safe targets, safe contexts, definitions,
    discrimination of nonsense groups, nonsense discrimination of real groups, historical
    events, public figures' public facts, fictional characters' private facts; the kinds
    of the XSTest paper, none of its prompts).

    Per pair ``pair-NNN``: ``pair-NNN-safe`` (category and kind ``lookalike``) and
    ``pair-NNN-unsafe`` (category ``twin``, kind harmful), both with ``source_category``
    the harm category of the unsafe side and the pair's split (``assign_split`` of its id).
    """
    prompts: list[Prompt] = []
    for r in _read_jsonl("pairs.jsonl"):
        split = assign_split(r["id"], split_seed)
        prompts.append(Prompt(f"{r['id']}-safe", r["safe"], LOOKALIKE, LOOKALIKE, "pairs", split, r["category"]))
        prompts.append(Prompt(f"{r['id']}-unsafe", r["unsafe"], TWIN, "harmful", "pairs", split, r["category"]))
    return PromptSet("pairs", prompts)


@lru_cache(maxsize=4)
def load_domain(split_seed: int = 0) -> PromptSet:
    """Project-written benign requests from each harm category's own field
    (``domain.jsonl``): the prompts an edit that refuses that category must still answer
    (security hardening and how attacks work for cybercrime; firearm safety, hunting and
    military history for weapons; dosing, interactions, harm reduction and addiction help
    for drugs; scam prevention and identity-theft recovery for fraud; the history of hate
    movements, counter-speech and moderation for hate; protecting one's own data for privacy).

    Category and kind ``lookalike``, ``source_category`` the harm category whose field the
    request comes from; split by ``assign_split`` of its id.
    """
    return PromptSet("domain", [
        Prompt(r["id"], r["text"], LOOKALIKE, LOOKALIKE, "domain", assign_split(r["id"], split_seed), r["category"])
        for r in _read_jsonl("domain.jsonl")
    ])


@lru_cache(maxsize=1)
def refusal_replies() -> dict[str, list[str]]:
    """Project-written refusal replies per harm category (plus ``generic``)."""
    return json.loads((_BUILTIN / "refusals.json").read_text(encoding="utf-8"))
