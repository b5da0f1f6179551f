"""A gated run's refusal as its gate's threshold is raised after training (no refit, no retraining).

Loads ``RUN/checkpoint``, finds the gate neurons from ``RUN/delta.safetensors`` and, for each
shift ``Δ``, rewrites their gate rows from ``s·(w − τ·m)`` to ``s·(w − (τ + Δ)·m)``, keeping
the trained down columns (``m`` is recovered from the up row, which is proportional to it:
``u = c·m/(s·n)`` and ``m·x ≈ 1`` on chat positions). It then generates and judges every
prompt of a set (default XSTest) and prints refusal per category and per kind: the
trade-off one gate can reach on that set by threshold alone. A larger ``Δ`` shuts the gate
on more prompts and shrinks its push everywhere (the push is proportional to the margin).

    .venv/bin/python -m experiments.gate_threshold_frontier runs/qwen-lift-pairs --shifts 0 1 2 4
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdelta.data.registry import load_source
from cdelta.edit.delta import load_sparse
from cdelta.edit.gate import STEEPNESS, recording_mlp_input
from cdelta.evaluate import judge_generations, refusal_stats, summarize
from cdelta.judge import get_judge
from cdelta.models.architecture import mlp
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model
from experiments.gate_openings import host_of


@torch.no_grad()
def unit_direction_from_up(model, tokenizer, layer: int, neurons: list[int], texts: list[str]) -> torch.Tensor:
    """``m`` [d_model]: the neurons' (shared) up row scaled so that ``m·x`` averages 1 over every chat position of ``texts``."""
    up = mlp(model, layer).up_proj.weight[neurons[0]].float()
    batch = encode_chat(tokenizer, texts)
    with recording_mlp_input(model, layer) as inputs:
        model.get_decoder()(**batch, use_cache=False)
    x = inputs[0][batch["attention_mask"].bool()].float()
    return up / (x @ up).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--shifts", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0], help="threshold shifts Δ (probe-logit units)")
    parser.add_argument("-p", "--prompts", default="../shared/data/xstest_prompts.csv", help="prompt source spec (as cdelta eval -p)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = load_model(str(args.run / "checkpoint"))
    layer, neurons = host_of(load_sparse(args.run / "delta.safetensors")[0])
    prompts = load_source(args.prompts)
    m = unit_direction_from_up(lm.model, lm.tokenizer, layer, neurons, prompts.texts()[:64])
    gate = mlp(lm.model, layer).gate_proj.weight
    trained = gate[neurons].clone()
    judge = get_judge("classifier")
    print(f"{args.run}: gate L{layer} neurons {neurons}; {len(prompts.prompts)} prompts of {prompts.name}")
    for shift in args.shifts:
        with torch.no_grad():
            gate[neurons] = trained - STEEPNESS * shift * m.to(gate.dtype)
        _, refused = judge_generations(lm.model, lm.tokenizer, prompts, judge, args.max_new_tokens, args.batch_size, progress=False)
        cells = refusal_stats(prompts, refused)
        pooled = summarize({prompts.name: cells})["pooled"]
        print(f"Δτ = {shift:g}: " + "; ".join(f"{kind} {row['refusals']}/{row['n']} = {100 * row['refusal_rate']:.1f}%" for kind, row in pooled.items())
              + " | " + ", ".join(f"{cat} {cell.refusals}/{cell.n}" for cat, cell in cells.items()), flush=True)


if __name__ == "__main__":
    main()
