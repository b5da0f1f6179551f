"""Does a gated ΔθC's gate open in deployment contexts as it does in the plain one?

Loads a gated run's base model and sparse delta and, for the validation (or another
split's) prompts of the built-in set and the domain look-alikes, each put in every
prompt-changing context with instances of the same split (``data.contexts``), records
the gate neurons' summed activation at the decision position (the last prompt token,
which predicts the reply's first token). Prints, per context, the fraction of each
group's prompts on which the gate is open there (activation above ``OPEN``).

Only forward passes: it separates "the gate does not open" from "the gate opens but the
learned write does not make the model refuse" without generating.

    .venv/bin/python -m experiments.gate_contexts runs/smollm2-cybercrime-gated-span
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdelta.data.builtin import load_builtin, load_domain
from cdelta.data.contexts import CONVERSATION, PLAIN, PROMPT_CONTEXTS, contextualize, harmless_requests
from cdelta.data.prompts import PromptSet
from cdelta.edit.delta import apply_to_model, load_sparse
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from experiments.gate_openings import OPEN, activations, host_of


def decision_activation(lm, layer: int, neurons: list[int], prompts: PromptSet, batch_size: int = 16) -> torch.Tensor:
    """Summed gate activation at each prompt's decision position: [n_prompts]."""
    chats = [p.chat for p in prompts]
    out = []
    for start in range(0, len(chats), batch_size):
        batch = encode_chat(lm.tokenizer, chats[start : start + batch_size])  # left-padded: -1 is the last prompt token
        out.append(activations(lm.model, layer, neurons, **batch)[:, -1])
    return torch.cat(out)


def groups_of(prompts: PromptSet, target: str) -> dict[str, PromptSet]:
    """The target first, then each other category of ``prompts``."""
    out = {c: prompts.filter(category=c) for c in prompts.categories()}
    return {target: out.pop(target), **out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--split", default="val", help="prompt split and context-instance split (default val)")
    args = parser.parse_args()
    torch.manual_seed(0)
    delta, manifest = load_sparse(args.run_dir / "delta.safetensors")
    target = manifest["category"][0] if isinstance(manifest["category"], list) else manifest["category"]
    lm = load_model(manifest["base_model"])
    apply_to_model(lm.model, delta)
    layer, neurons = host_of(delta)
    builtin = load_builtin()
    prompts = builtin.filter(split=args.split)
    domain = [p for p in load_domain().filter(split=args.split) if p.source_category == target]
    sets = {**groups_of(prompts, target), f"field:{target}": PromptSet("domain", domain)}
    harmless = harmless_requests(builtin, args.split)
    print(f"host L{layer}.MLP neurons {neurons}; split {args.split}; % of prompts open at the decision position")
    contexts = (PLAIN, *PROMPT_CONTEXTS)
    print(f"{'group':>18} " + " ".join(f"{c:>12}" for c in contexts))
    for name, members in sets.items():
        cells = []
        for context in contexts:
            placed = contextualize(members, context, args.split, 0, harmless if context == CONVERSATION else None)
            act = decision_activation(lm, layer, neurons, placed)
            cells.append(f"{100 * float((act > OPEN).float().mean()):6.1f} ({len(act):>3})")
        print(f"{name:>18} " + " ".join(f"{c:>12}" for c in cells))


if __name__ == "__main__":
    main()
