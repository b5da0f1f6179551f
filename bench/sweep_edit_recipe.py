"""Sweep the masked fine-tune's learning rate / steps / retain weight on SmolLM2 (cybercrime).

A fixed mask (whole MLPs of the given layers) isolates the training recipe from the
circuit choice. Prints validation refusal per group (target, other harmful, harmless,
look-alike) for the base and each setting, judged on 16-token replies by the marker judge.

    .venv/bin/python bench/sweep_edit_recipe.py --layers 14,18 --retain-other 12 1e-3:30:1
    .venv/bin/python bench/sweep_edit_recipe.py --layers 14,18 --retain-other 42 --base 1e-3:30:3
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from cdelta.data.builtin import load_builtin
from cdelta.edit.data import own_reply_pairs, refusal_pairs, retain_prompts
from cdelta.edit.delta import apply_to_model
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
    parser.add_argument("--base", action="store_true", help="also evaluate the base model")
    args = parser.parse_args()
    lm = load_model("smollm2-135m")
    arch, prompts = architecture_of(lm.model), load_builtin()
    target = prompts.filter(category="cybercrime", split="train")
    retain_set = retain_prompts(prompts, ["cybercrime"], {"harmless": 64, "lookalike": 48, "other": args.retain_other})
    retain = own_reply_pairs(lm.model, lm.tokenizer, retain_set, 16, progress=False)
    val = prompts.filter(split="val")
    if args.base:
        print("base", val_refusal(lm.model, lm.tokenizer, val), flush=True)
    params = dict(lm.model.named_parameters())
    masks = {
        arch.mlp_param(layer, proj): torch.ones_like(params[arch.mlp_param(layer, proj)], dtype=torch.bool)
        for layer in map(int, args.layers.split(",")) for proj in ("gate", "up", "down")
    }
    print(f"mask: MLPs {args.layers}, {sum(int(m.sum()) for m in masks.values()) / sum(p.numel() for p in lm.model.parameters()):.4f} of parameters")
    for setting in args.settings:
        lr, steps, weight = setting.split(":")
        config = TrainConfig(steps=int(steps), lr=float(lr), retain_weight=float(weight), retain_batch_size=8, max_reply_tokens=16)
        start = time.perf_counter()
        delta = masked_finetune(lm.model, lm.tokenizer, masks, EditData(refusal_pairs(target, "cybercrime"), retain), config, progress=False)
        edited = copy.deepcopy(lm.model)
        apply_to_model(edited, delta)
        print(f"lr={lr} steps={steps} retain_weight={weight} ({time.perf_counter() - start:.0f} s):", val_refusal(edited, lm.tokenizer, val), flush=True)


if __name__ == "__main__":
    main()
