"""Where a gated ΔθC opens: chat prompts of each category vs plain prose.

Loads the base model of a gated run (``cdelta run --variant gated``), applies the run's
sparse delta and records the host neurons' activation at every position of

* the project's validation prompts per category, through the chat template (all prompt
  positions, and the decision position, the last prompt token, where the model decides
  how to start its reply), and
* the perplexity text (plain prose, no template), in 512-token windows.

A position counts as open when the gate neurons' summed activation exceeds 1 (the
activation is ≈ ``c·max(w·x − τ, 0)`` with ``c`` tens to hundreds, so closed positions sit
near 0). Prints the fraction of open positions per set, the prompts open at their decision
position, and the run's perplexity ratio.

    .venv/bin/python -m experiments.gate_openings runs/smollm2-gated
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from cdelta.data.builtin import load_builtin
from cdelta.data.public import load_ppl_text
from cdelta.edit.delta import apply_to_model, load_sparse
from cdelta.edit.gate import recording_mlp_input
from cdelta.models.architecture import mlp, mlp_neurons
from cdelta.models.chat import encode_chat
from cdelta.models.loading import load_model

OPEN = 1.0
"""Summed activation above which a position counts as open."""


def host_of(delta: dict[str, torch.Tensor]) -> tuple[int, list[int]]:
    """(layer, neurons) of a gated delta: the rows its gate_proj change touches."""
    name = next(n for n in delta if n.endswith("mlp.gate_proj.weight"))
    layer = int(name.split(".")[-4])
    return layer, (delta[name] != 0).any(1).nonzero().flatten().tolist()


@torch.no_grad()
def activations(model, layer: int, neurons: list[int], **inputs) -> torch.Tensor:
    """Summed activation of ``neurons`` in ``layer``'s MLP at every position: [batch, seq]."""
    with recording_mlp_input(model, layer) as store:
        model(**inputs)
    return mlp_neurons(mlp(model, layer), store[0])[..., neurons].sum(-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    delta, manifest = load_sparse(args.run_dir / "delta.safetensors")
    lm = load_model(manifest["base_model"])
    apply_to_model(lm.model, delta)
    layer, neurons = host_of(delta)
    print(f"host L{layer}.MLP, neurons {neurons}")
    val = load_builtin().filter(split="val")
    for category in val.categories():
        texts = val.filter(category=category).texts()
        opened, total, decided = 0, 0, 0
        for start in range(0, len(texts), 16):
            batch = encode_chat(lm.tokenizer, texts[start : start + 16])  # left-padded: -1 is the last prompt token
            act = activations(lm.model, layer, neurons, **batch)
            real = act[batch["attention_mask"].bool()]
            opened, total, decided = opened + int((real > OPEN).sum()), total + real.numel(), decided + int((act[:, -1] > OPEN).sum())
        print(f"{category:>10}: {opened / total:6.1%} of {total} chat prompt positions open; "
              f"{decided}/{len(texts)} prompts open at the decision position")
    ids = lm.tokenizer(load_ppl_text(), return_tensors="pt")["input_ids"][0]
    act = torch.cat([activations(lm.model, layer, neurons, input_ids=ids[s : s + 512][None])[0] for s in range(0, len(ids), 512)])
    print(f"{'prose':>10}: {(act > OPEN).float().mean():6.1%} of {act.numel()} plain-text positions open")
    results = json.loads((args.run_dir / "results.json").read_text())
    print(f"perplexity ratio (results.json): {results['edited']['utility']['perplexity_ratio']:.3f}")


if __name__ == "__main__":
    main()
