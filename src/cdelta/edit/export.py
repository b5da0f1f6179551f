"""Export: a drop-in Hugging Face checkpoint with a model card, plus the sparse delta."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cdelta.edit.delta import Delta, count_touched, save_sparse, write_edited_checkpoint
from cdelta.io import atomic_write_bytes


def base_model_dir(lm, scratch: Path) -> Path:
    """A local directory holding the base weights (hub models are saved to ``scratch`` first)."""
    if lm.path is not None:
        return lm.path
    lm.model.save_pretrained(scratch)
    lm.tokenizer.save_pretrained(scratch)
    return scratch


def export_edit(lm, delta: Delta, out_dir: Path, manifest: dict) -> dict:
    """Write ``out_dir/checkpoint`` (base + ΔθC) and ``out_dir/delta.safetensors``.

    ``manifest`` (category, circuit summary, k, seed, ...) goes into the delta header
    and the model card; returns the full manifest with base hash and touched count.
    """
    out_dir = Path(out_dir)
    total = sum(p.numel() for p in _unique_parameters(lm.model))
    touched = count_touched(delta)
    full = {
        **manifest,
        "base_model": lm.name,
        "base_weights_sha256": lm.weights_sha256,
        "params_touched": touched,
        "params_total": total,
        "params_touched_fraction": touched / total,
    }
    save_sparse(delta, out_dir / "delta.safetensors", full)
    write_edited_checkpoint(base_model_dir(lm, out_dir / ".base"), delta, out_dir / "checkpoint")
    write_model_card(out_dir / "checkpoint", full)
    return full


def _unique_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters counted once (tied embeddings share storage)."""
    seen, unique = set(), []
    for param in model.parameters():
        if param.data_ptr() not in seen:
            seen.add(param.data_ptr())
            unique.append(param)
    return unique


def write_model_card(checkpoint: Path, info: dict, metrics: dict | None = None) -> None:
    """README.md model card: base model and hash, category, circuit, k, seed, measured metrics."""
    lines = [
        "---",
        "tags: [cdelta, selective-refusal, circuit-restricted-edit]",
        f"base_model_sha256: {info['base_weights_sha256']}",
        "---",
        f"# {info['base_model']} + C-Δθ ({info.get('direction', 'refuse')} {info.get('category', '?')})",
        "",
        "This checkpoint is the base model plus a circuit-restricted weight update ΔθC made with",
        "[cdelta](https://pypi.org/project/cdelta/). It loads with plain `transformers`; no runtime hooks.",
        "",
        f"- base model: `{info['base_model']}` (weights sha256 `{info['base_weights_sha256']}`)",
        f"- category: `{info.get('category')}`, direction: `{info.get('direction', 'refuse')}`",
        f"- parameters touched: {info['params_touched']:,} of {info['params_total']:,} ({info['params_touched_fraction']:.3%})",
        f"- seed: {info.get('seed')}, k: {info.get('k')}",
        "",
        "## Settings",
        "```json",
        json.dumps({k: v for k, v in info.items() if k not in {"shapes"}}, indent=2, sort_keys=True, default=str),
        "```",
    ]
    if metrics:
        lines += ["", "## Measured", "```json", json.dumps(metrics, indent=2, sort_keys=True), "```"]
    atomic_write_bytes(checkpoint / "README.md", ("\n".join(lines) + "\n").encode())
