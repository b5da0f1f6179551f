"""The model card (README.md) written into every edited checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from cdelta.io import atomic_write_bytes


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
