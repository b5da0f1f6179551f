"""The ``PromptSet`` abstraction: prompts with category, source, kind and split."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace

HARM_CATEGORIES = ("cybercrime", "weapons", "drugs", "fraud", "hate", "privacy")
"""The project's harm categories (see docs/categories.md for each source's mapping)."""

HARMLESS = "harmless"
LOOKALIKE = "lookalike"
TWIN = "twin"
"""Category of the harmful twins of the look-alikes (``data.builtin.load_twins``): kind harmful."""
KINDS = ("harmful", HARMLESS, LOOKALIKE)
SPLITS = ("train", "val", "test")
SPLIT_FRACTIONS = (0.5, 0.2, 0.3)
"""Fractions of each category assigned to train/val/test by ``assign_split``."""
DEFAULT_SPLIT_SEED = 0

Chat = tuple[tuple[str, str], ...]
"""A conversation as (role, content) messages, roles ``system``, ``user``, ``assistant``."""


@dataclass(frozen=True)
class Prompt:
    """One prompt.

    ``category`` is a project category for harmful prompts, ``harmless`` or
    ``lookalike`` otherwise, or ``other`` when a source category maps to nothing;
    ``source_category`` keeps the source's own label. ``kind`` is one of ``KINDS``.
    ``context`` holds the (role, content) messages before the request's user turn (a
    system prompt, earlier exchanges: ``data.contexts``); empty means one user turn under
    the model's default system prompt.
    """

    id: str
    text: str
    category: str
    kind: str
    source: str
    split: str = "test"
    source_category: str = ""
    context: Chat = ()

    @property
    def chat(self) -> str | Chat:
        """What the chat template renders: the text alone, or the context and the request's user turn."""
        return self.context + (("user", self.text),) if self.context else self.text


def assign_split(prompt_id: str, seed: int = DEFAULT_SPLIT_SEED) -> str:
    """Deterministic split of one prompt id: a seeded hash mapped onto ``SPLIT_FRACTIONS``."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for split, fraction in zip(SPLITS, SPLIT_FRACTIONS):
        edge += fraction
        if u < edge:
            return split
    return SPLITS[-1]


class PromptSet:
    """An ordered, immutable collection of prompts with filtering helpers."""

    def __init__(self, name: str, prompts: list[Prompt]) -> None:
        self.name = name
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __iter__(self) -> Iterator[Prompt]:
        return iter(self.prompts)

    def __add__(self, other: PromptSet) -> PromptSet:
        return PromptSet(f"{self.name}+{other.name}", self.prompts + other.prompts)

    def __repr__(self) -> str:
        return f"PromptSet({self.name!r}, n={len(self)}, categories={self.categories()})"

    def texts(self) -> list[str]:
        """Prompt texts in order."""
        return [p.text for p in self.prompts]

    def chats(self) -> list[str | Chat]:
        """What the chat template renders for each prompt, in order (``Prompt.chat``)."""
        return [p.chat for p in self.prompts]

    def categories(self) -> list[str]:
        """Distinct categories in first-seen order."""
        return list(dict.fromkeys(p.category for p in self.prompts))

    def filter(
        self,
        category: str | list[str] | None = None,
        split: str | list[str] | None = None,
        kind: str | list[str] | None = None,
        exclude_category: str | list[str] | None = None,
    ) -> PromptSet:
        """Prompts matching every given criterion (a string or a list of accepted values)."""

        def accepted(value: str | list[str] | None) -> set[str] | None:
            return None if value is None else ({value} if isinstance(value, str) else set(value))

        cats, splits, kinds, excluded = map(accepted, (category, split, kind, exclude_category))
        kept = [
            p
            for p in self.prompts
            if (cats is None or p.category in cats)
            and (splits is None or p.split in splits)
            and (kinds is None or p.kind in kinds)
            and (excluded is None or p.category not in excluded)
        ]
        return PromptSet(self.name, kept)

    def with_splits(self, seed: int = DEFAULT_SPLIT_SEED) -> PromptSet:
        """A copy whose prompts get seeded splits from their ids."""
        return PromptSet(self.name, [replace(p, split=assign_split(p.id, seed)) for p in self.prompts])

    def sample(self, n: int, seed: int = 0) -> PromptSet:
        """Up to ``n`` prompts chosen deterministically by a seeded hash of their ids."""
        ranked = sorted(self.prompts, key=lambda p: hashlib.sha256(f"{seed}:{p.id}".encode()).digest())
        chosen = {p.id for p in ranked[:n]}
        return PromptSet(self.name, [p for p in self.prompts if p.id in chosen])
