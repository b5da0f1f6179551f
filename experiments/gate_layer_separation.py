"""Per layer: how well a decision-position probe separates a target from its negatives.

For every MLP layer of the model, fits the gated variant's probe (``fit_gate_probe``) on the
MLP input at the decision position (the last prompt token, through the chat template) of
the train-split prompts of a run (``data.runs.run_prompts``): the target category against
every other harmful category and the look-alikes (target ``lookalike``: the look-alikes
against every harmful prompt, twins included), and scores the validation split. Prints per
layer the validation AUC and the fraction of validation negatives above the threshold that
keeps 80% of the validation positives. It shows whether the host EAP-IG picks (``run.log``)
is a layer where the category is linearly visible, and how a random host compares.

``--hold-out SOURCE`` leaves one prompt source (e.g. ``pairs``, the minimal pairs) out of
the fit and the validation split and scores all of its prompts as well: how the probe
transfers to prompts written apart from those it was fitted on, as XSTest's are.
``--and-layers L1 L2 ...`` also scores an AND of those layers' probes (each score
standardized on the validation positives, the AND their minimum): whether several linear
reads together separate better than one.

    .venv/bin/python -m experiments.gate_layer_separation smollm2-135m cybercrime
    .venv/bin/python -m experiments.gate_layer_separation qwen2.5-0.5b lookalike --hold-out pairs --and-layers 18 23
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack

import torch

from cdelta.data.prompts import LOOKALIKE, Prompt, PromptSet
from cdelta.data.registry import load_source
from cdelta.edit.gate import fit_gate_probe, recording_mlp_input
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from cdelta.data.runs import run_prompts

PROBE_L2 = 1e-2
"""Probe L2 here: decision positions only are ~10× fewer samples than the gate's fit."""


@torch.no_grad()
def decision_inputs(lm, texts: list[str], batch_size: int = 16, layers: list[int] | None = None) -> dict[int, torch.Tensor]:
    """``{layer: MLP input at each prompt's last token [n_prompts, d_model]}`` for ``layers``
    (default every layer), one forward pass per batch."""
    layers = range(lm.model.config.num_hidden_layers) if layers is None else layers
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    with ExitStack() as stack:
        inputs = {layer: stack.enter_context(recording_mlp_input(lm.model, layer)) for layer in layers}
        for start in range(0, len(texts), batch_size):
            lm.model.get_decoder()(**encode_chat(lm.tokenizer, texts[start : start + batch_size]), use_cache=False)
            for layer in layers:  # left-padded: -1 is the last prompt token
                out[layer].append(inputs[layer].pop()[:, -1].float())
    return {layer: torch.cat(out[layer]) for layer in layers}


def is_positive(prompt: Prompt, target: str) -> bool:
    """Whether the probe for ``target`` should fire on ``prompt``: a look-alike (target
    ``lookalike``) or a prompt of the target category."""
    return prompt.kind == LOOKALIKE if target == LOOKALIKE else prompt.category == target


def is_negative(prompt: Prompt, target: str) -> bool:
    """Whether the probe for ``target`` should stay shut on ``prompt``: any harmful prompt
    (target ``lookalike``), else a harmful prompt or look-alike of another category."""
    if target == LOOKALIKE:
        return prompt.kind == "harmful"
    return prompt.kind in ("harmful", LOOKALIKE) and prompt.category != target


def split_sets(prompts: PromptSet, target: str, split: str | None) -> tuple[list[str], list[str]]:
    """(positive, negative) prompt texts of one split (``None``: every split)."""
    part = [p for p in prompts if split is None or p.split == split]
    return [p.text for p in part if is_positive(p, target)], [p.text for p in part if is_negative(p, target)]


def auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """P(a positive scores above a negative) from scores [n_pos], [n_neg]."""
    return float((positive[:, None] > negative[None, :]).float().mean())


def report(label: str, val: tuple[torch.Tensor, torch.Tensor], held: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    """Print validation AUC and the negatives open at the threshold keeping 80% of validation
    positives, and the same threshold on held-out scores; ``val``/``held``: (positive, negative) scores."""
    pos, neg = val
    threshold = pos.quantile(0.2)
    line = f"{label:<6s} validation AUC {auc(pos, neg):.3f}; negatives open at 80% of positives: {float((neg > threshold).float().mean()):.3f}"
    if held:
        pos, neg = held
        line += (f" | held out: AUC {auc(pos, neg):.3f}, at that threshold positives open {float((pos > threshold).float().mean()):.3f}, "
                 f"negatives {float((neg > threshold).float().mean()):.3f}")
    print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("target")
    parser.add_argument("--hold-out", metavar="SOURCE", help="prompt source left out of the fit and scored whole (e.g. pairs)")
    parser.add_argument("--and-layers", type=int, nargs="+", default=[], metavar="L", help="also score the AND of these layers' probes")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    prompts = run_prompts([args.target])
    held = None
    if args.hold_out:
        prompts = PromptSet(prompts.name, [p for p in prompts if p.source != args.hold_out])
        held = [decision_inputs(lm, t) for t in split_sets(load_source(args.hold_out), args.target, None)]
    (train_pos, train_neg), (val_pos, val_neg) = (split_sets(prompts, args.target, s) for s in ("train", "val"))
    print(f"train {len(train_pos)} positive / {len(train_neg)} negative prompts; val {len(val_pos)} / {len(val_neg)}"
          + (f"; held out ({args.hold_out}) {len(held[0][0])} / {len(held[1][0])}" if held else ""))
    x_train_pos, x_train_neg, x_val_pos, x_val_neg = (decision_inputs(lm, t) for t in (train_pos, train_neg, val_pos, val_neg))
    scores = {}  # layer -> standardized (val positive, val negative, held positive, held negative) scores
    for layer in x_train_pos:
        w = fit_gate_probe(x_train_pos[layer], x_train_neg[layer], l2=PROBE_L2)
        val = (x_val_pos[layer] @ w, x_val_neg[layer] @ w)
        held_scores = (held[0][layer] @ w, held[1][layer] @ w) if held else None
        report(f"L{layer}", val, held_scores)
        mean, std = val[0].mean(), val[0].std()
        scores[layer] = [(s - mean) / std for s in val + (held_scores or ())]
    if args.and_layers:
        combined = [torch.stack(parts).min(0).values for parts in zip(*(scores[layer] for layer in args.and_layers))]
        report("AND " + "+".join(f"L{layer}" for layer in args.and_layers), tuple(combined[:2]), tuple(combined[2:]) or None)


if __name__ == "__main__":
    main()
