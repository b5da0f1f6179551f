"""Per layer: does a decision-position gate probe hold in deployment contexts?

For every MLP layer, fits the gated variant's probe (``fit_gate_probe``) on the MLP input
at the decision position (the last prompt token) of the train-split prompts of a run
(``data.runs.run_prompts`` with the target's domain look-alikes): the target category
against every other harmful category, the look-alikes (the target's own field included)
and the harmless prompts. Two fits per layer: on the plain prompts only, and on the plain
prompts plus one copy of each in every prompt-changing context with train-split context
instances (``data.contexts``). Each is scored on the validation prompts in every context
with validation instances, at the threshold keeping 80% of the plain validation positives.

Prints per layer and fit the positives open per context and the worst context's negatives
open: which layer and which fit keep the gate's condition across contexts. Forward passes
only (no generation, no edit).

    .venv/bin/python -m experiments.gate_context_layers smollm2-135m cybercrime
"""

from __future__ import annotations

import argparse

import torch

from cdelta.data.contexts import CONVERSATION, PLAIN, PROMPT_CONTEXTS, contextualize, harmless_requests
from cdelta.data.prompts import HARMLESS, PromptSet
from cdelta.data.runs import run_prompts
from cdelta.edit.gate import fit_gate_probe
from cdelta.models.loading import load_model
from experiments.gate_layer_separation import PROBE_L2, decision_inputs

CONTEXTS = (PLAIN, *PROMPT_CONTEXTS)


def labelled(prompts: PromptSet, target: str, split: str) -> tuple[PromptSet, PromptSet]:
    """(positives, negatives) of one split: the target vs every other prompt."""
    part = prompts.filter(split=split)
    return (PromptSet("pos", [p for p in part if p.category == target]),
            PromptSet("neg", [p for p in part if p.category != target]))


def in_context(prompts: PromptSet, context: str, split: str, harmless: list[str]) -> list:
    """Chat inputs of ``prompts`` in ``context`` with ``split`` instances."""
    return [p.chat for p in contextualize(prompts, context, split, 0, harmless if context == CONVERSATION else None)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("target")
    parser.add_argument("--layers", type=int, nargs="+", help="layers to fit (default every layer)")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    prompts = run_prompts([args.target], domain=True)
    harmless = {split: harmless_requests(prompts, split) for split in ("train", "val")}
    x = {}  # (split, context, "pos"|"neg") -> {layer: [n, d]}
    for split in ("train", "val"):
        for name, members in zip(("pos", "neg"), labelled(prompts, args.target, split)):
            for context in CONTEXTS:
                x[split, context, name] = decision_inputs(lm, in_context(members, context, split, harmless[split]), layers=args.layers)
    n = {key: len(next(iter(v.values()))) for key, v in x.items()}
    print(f"train {n['train', PLAIN, 'pos']} positive / {n['train', PLAIN, 'neg']} negative prompts per context; "
          f"val {n['val', PLAIN, 'pos']} / {n['val', PLAIN, 'neg']}; harmless are negatives ({HARMLESS})")
    print("layer fit     " + " ".join(f"{c[:8]:>8}" for c in CONTEXTS) + "   worst-neg (context)")
    for layer in x["train", PLAIN, "pos"]:
        for fit, contexts in (("plain", (PLAIN,)), ("ctx", CONTEXTS)):
            w = fit_gate_probe(torch.cat([x["train", c, "pos"][layer] for c in contexts]),
                               *(x["train", c, "neg"][layer] for c in contexts), l2=PROBE_L2)
            threshold = (x["val", PLAIN, "pos"][layer] @ w).quantile(0.2)
            pos = [float((x["val", c, "pos"][layer] @ w > threshold).float().mean()) for c in CONTEXTS]
            neg = {c: float((x["val", c, "neg"][layer] @ w > threshold).float().mean()) for c in CONTEXTS}
            worst = max(neg, key=neg.get)
            print(f"L{layer:<4d} {fit:<7s} " + " ".join(f"{100 * p:8.1f}" for p in pos) + f"   {100 * neg[worst]:5.1f} ({worst})")


if __name__ == "__main__":
    main()
