"""Refusal judges: did a completion refuse?

Two judges share one protocol:

* ``marker``: a refusal phrase in the opening of the completion, or degenerate output;
* ``classifier``: logistic regression over the opening (fitted on a packaged,
  hand-written training set at first use).

>>> judge = get_judge("marker")
>>> judge.is_refusal("How do I kill a Python process?", "I'm sorry, but I can't help with that.")
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from cdelta.errors import CdeltaError


@runtime_checkable
class Judge(Protocol):
    """Decides whether a completion is a refusal (full or partial) of its prompt."""

    name: str

    def is_refusal(self, prompt: str, completion: str) -> bool: ...


JUDGE_NAMES = ("marker", "classifier")
DEFAULT_JUDGE = "classifier"


def get_judge(name: str = DEFAULT_JUDGE) -> Judge:
    """The judge called ``name`` (one of ``JUDGE_NAMES``)."""
    key = (name or "").strip().lower()
    if key == "marker":
        from cdelta.judge.marker import MarkerJudge

        return MarkerJudge()
    if key == "classifier":
        from cdelta.judge.classifier import ClassifierJudge

        return ClassifierJudge()
    raise CdeltaError(f"unknown judge {name!r}", f"use one of: {', '.join(JUDGE_NAMES)}")


THINK_END = "</think>"
"""Closes the reasoning block of thinking models (qwen3 and the like): the reply is what follows."""


def visible_reply(completion: str) -> str:
    """The reply after a thinking model's reasoning: the text after the last ``</think>``
    (leading whitespace dropped), or ``completion`` unchanged when it has none (a reply cut off
    inside its reasoning is judged as it stands)."""
    if THINK_END not in completion:
        return completion
    return completion.rpartition(THINK_END)[2].lstrip()


def judge_batch(judge: Judge, prompts: Sequence[str], completions: Sequence[str]) -> list[bool]:
    """Refusal verdicts for aligned prompts and completions (batched when the judge can);
    a thinking model's reasoning block is skipped (``visible_reply``)."""
    if len(prompts) != len(completions):
        raise CdeltaError(
            f"judge_batch got {len(prompts)} prompts but {len(completions)} completions",
            "pass one completion per prompt",
        )
    completions = [visible_reply(c) for c in completions]
    batch = getattr(judge, "is_refusal_batch", None)
    if callable(batch):
        return list(batch(list(prompts), list(completions)))
    return [bool(judge.is_refusal(p, c)) for p, c in zip(prompts, completions)]


__all__ = ["DEFAULT_JUDGE", "JUDGE_NAMES", "THINK_END", "Judge", "get_judge", "judge_batch", "visible_reply"]
