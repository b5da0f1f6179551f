"""Sweep the masked fine-tune's learning rate / steps / retain weight on SmolLM2 (cybercrime).

A fixed mask (whole MLPs of the given layers, or a saved circuit selected by a spec)
isolates the training recipe from the circuit choice. Prints validation refusal per
group (target, other harmful, harmless, look-alike) for the base and each setting and
scale k, judged on 16-token replies by the marker judge.

    .venv/bin/python -m experiments.sweep_edit_recipe --layers 14,18 --retain-other 12 1e-3:30:1
    .venv/bin/python -m experiments.sweep_edit_recipe --layers 14,18 --retain-other 42 --base 1e-3:30:3
    .venv/bin/python -m experiments.sweep_edit_recipe --circuit runs/smollm2-cyber/localize/cybercrime/circuit.json \
        --spec params:0.04 --retain-other 42 --k 1,1.5 1e-3:60:3
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch

from cdelta.circuits.circuit import Circuit
from cdelta.data.builtin import load_builtin
from cdelta.edit.data import own_reply_pairs, refusal_pairs, retain_prompts
from cdelta.edit.delta import apply_to_model, compose
from cdelta.evaluate import limit_per_category
from cdelta.edit.train import EditData, TrainConfig, masked_finetune
from cdelta.generation import generate
from cdelta.judge.marker import MarkerJudge
from cdelta.models.architecture import architecture_of
from cdelta.models.loading import load_model


def val_refusal(model, tokenizer, val) -> dict[str, str]:
    """Refusal per group on the validation split (16 new tokens, marker judge)."""
    judge, counts = MarkerJudge(), {}
    for prompt, reply in zip(val, generate(model, tokenizer, val.texts(), 16, 32, progress=False)):
        key = prompt.category if prompt.category in ("cybercrime", "harmless", "lookalike") else "other"
        cell = counts.setdefault(key, [0, 0])
        cell[0] += judge.is_refusal(prompt.text, reply)
        cell[1] += 1
    return {k: f"{a}/{b}={a / b:.2f}" for k, (a, b) in counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("settings", nargs="+", help="lr:steps:retain_weight")
    parser.add_argument("--layers", default="14,18")
    parser.add_argument("--retain-other", type=int, default=12)
    parser.add_argument("--circuit", help="circuit.json from cdelta localize (instead of --layers)")
    parser.add_argument("--spec", default="params:0.02", help="selection applied to --circuit")
    parser.add_argument("--k", default="1", help="comma-separated scales of the trained delta")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--retain-json", help="reuse (prompt, base reply) pairs from a run's retain.json")
    parser.add_argument("--val-per-group", type=int, default=0, help="cap validation prompts per category (0: all)")
    parser.add_argument("--base", action="store_true", help="also evaluate the base model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("smollm2-135m")
    arch, prompts = architecture_of(lm.model), load_builtin()
    target = prompts.filter(category="cybercrime", split="train")
    retain_set = retain_prompts(prompts, ["cybercrime"], {"harmless": 64, "lookalike": 48, "other": args.retain_other})
    if args.retain_json:
        retain = [tuple(pair) for pair in json.loads(Path(args.retain_json).read_text())]
    else:
        retain = own_reply_pairs(lm.model, lm.tokenizer, retain_set, 16, progress=False)
    val = limit_per_category(prompts.filter(split="val"), args.val_per_group or None)
    if args.base:
        print("base", val_refusal(lm.model, lm.tokenizer, val), flush=True)
    masks, what = _masks(lm.model, arch, args)
    print(f"mask: {what}, {sum(int(m.sum()) for m in masks.values()) / sum(p.numel() for p in lm.model.parameters()):.4f} of parameters")
    for setting in args.settings:
        lr, steps, weight = setting.split(":")
        config = TrainConfig(steps=int(steps), lr=float(lr), retain_weight=float(weight), retain_batch_size=8, max_reply_tokens=16)
        start = time.perf_counter()
        delta = masked_finetune(lm.model, lm.tokenizer, masks, EditData(refusal_pairs(target, "cybercrime"), retain), config, progress=False)
        for k in map(float, args.k.split(",")):
            edited = copy.deepcopy(lm.model)
            apply_to_model(edited, compose(delta, None, k))
            print(f"lr={lr} steps={steps} retain_weight={weight} k={k:g} ({time.perf_counter() - start:.0f} s):",
                  val_refusal(edited, lm.tokenizer, val), flush=True)


def _masks(model, arch, args) -> tuple[dict[str, torch.Tensor], str]:
    """Boolean parameter masks: a saved circuit's selection, or whole MLPs of ``--layers``."""
    if args.circuit:
        circuit = Circuit.from_json(Path(args.circuit)).select_spec(args.spec, model)
        return circuit.param_masks(model), f"{args.spec} = {sorted(circuit.nodes)}"
    params = dict(model.named_parameters())
    masks = {
        arch.mlp_param(layer, proj): torch.ones_like(params[arch.mlp_param(layer, proj)], dtype=torch.bool)
        for layer in map(int, args.layers.split(",")) for proj in ("gate", "up", "down")
    }
    return masks, f"MLPs {args.layers}"


if __name__ == "__main__":
    main()
