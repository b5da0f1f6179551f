"""Is a gated ΔθC's shortfall in deployment contexts its condition or its write?

The gate's neurons add ``a(x)·d`` to the residual stream, ``a`` the gate activation and
``d`` the trained down column. This script scales ``d`` alone by a gain ``g`` (``g = 0`` is
the base model with its quietest host neurons silenced: the gate then writes nothing) and measures, on the
validation split in every prompt-changing context with validation instances, the target's
refusal and every other group's: if refusal behind a system prompt rises with ``g`` while
the other groups stay put, the gate opens there and the write is too weak.

    .venv/bin/python -m experiments.gate_write_gain runs/ctx2 --gains 0 1 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from cdelta.data.builtin import load_builtin, load_domain
from cdelta.data.contexts import PLAIN, PROMPT_CONTEXTS, harmless_requests
from cdelta.data.prompts import PromptSet
from cdelta.edit.delta import apply_to_model, load_sparse
from cdelta.evaluate import EvalConfig, _judged, evaluate_contexts
from cdelta.judge import get_judge
from cdelta.models.loading import load_model


def with_gain(delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor], gain: float) -> dict[str, torch.Tensor]:
    """``delta`` with its down-projection columns' trained values scaled by ``gain``
    (the gate and up rows unchanged): new column = ``gain·(base + Δ)``."""
    out = dict(delta)
    for name, value in delta.items():
        if name.endswith("down_proj.weight"):
            touched = value.abs().sum(0) != 0
            trained = base[name] + value
            out[name] = torch.where(touched[None, :], gain * trained - base[name], value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    parser.add_argument("--split", default="val")
    args = parser.parse_args()
    torch.manual_seed(0)
    delta, manifest = load_sparse(args.run_dir / "delta.safetensors")
    target = manifest["category"][0] if isinstance(manifest["category"], list) else manifest["category"]
    lm = load_model(manifest["base_model"])
    params = dict(lm.model.named_parameters())
    base = {name: params[name].detach().clone() for name in delta}
    builtin = load_builtin()
    field = PromptSet("field", [p for p in load_domain().filter(split=args.split) if p.source_category == target])
    sets = [builtin.filter(split=args.split), field]
    config = EvalConfig(split=args.split, contexts=(PLAIN, *PROMPT_CONTEXTS), mmlu_n=0)
    judge = get_judge(config.judge)
    harmless = harmless_requests(builtin, args.split)
    print(f"split {args.split}; refusal % per group (builtin categories, field = {target}'s domain look-alikes)")
    for gain in args.gains:
        with torch.no_grad():
            for name, value in base.items():
                params[name].copy_(value)
        apply_to_model(lm.model, with_gain(delta, base, gain))
        tables = {PLAIN: _judged(lm.model, lm.tokenizer, sets, judge, config, progress=False)[0]}
        tables.update({c: r["sets"] for c, r in evaluate_contexts(lm.model, lm.tokenizer, sets, harmless, config, judge, progress=False).items()})
        for context, table in tables.items():
            cells = {(cat if name != "field" else "field"): stat for name in table for cat, stat in table[name].items()
                     if ":" not in cat and (name != "field" or cat == "lookalike")}
            rate = {cat: 100 * (s.rate if hasattr(s, "rate") else s["refusal_rate"]) for cat, s in cells.items()}
            print(f"g={gain:<4g} {context:<13s} " + " ".join(f"{cat[:10]} {r:5.1f}" for cat, r in rate.items()), flush=True)


if __name__ == "__main__":
    main()
