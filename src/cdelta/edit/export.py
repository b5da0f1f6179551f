"""Export: a drop-in Hugging Face checkpoint with a model card, plus the sparse delta."""

from __future__ import annotations

from pathlib import Path

import torch

from cdelta.edit.card import write_model_card
from cdelta.edit.delta import Delta, count_touched, save_sparse, write_edited_checkpoint

__all__ = ["base_model_dir", "export_edit", "write_model_card"]


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
