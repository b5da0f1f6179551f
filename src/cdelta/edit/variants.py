"""Training ΔθC by variant: direct (one masked fine-tune), contrastive (θ_pos − θ_neg) or
gated (a compiled gate in one MLP and its trained down columns)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import TYPE_CHECKING

from cdelta.data.prompts import PromptSet
from cdelta.edit.delta import Delta, compose
from cdelta.edit.gate import fit_gate, gated_finetune
from cdelta.edit.gate_host import threshold_chooser
from cdelta.edit.train import EditData, masked_finetune, train_config
from cdelta.models.loading import LoadedModel

if TYPE_CHECKING:
    from cdelta.config import RunConfig

Log = Callable[[str], None]


def train_delta(lm: LoadedModel, masks, data: EditData, cfg: RunConfig, contrast_data: EditData | None, label: str,
                host: int | None = None, gate_val: PromptSet | None = None, log: Log = print) -> Delta:
    """Direct: one masked fine-tune. Contrastive: θ_pos − θ_neg from two masked fine-tunes.
    Gated: the compiled gate in MLP ``host`` and its trained down columns (without a host,
    e.g. the all-parameter control, gated trains directly); ``gate_threshold = "auto"``
    chooses its threshold on ``gate_val``."""
    train = train_config(cfg)
    if cfg.variant == "gated" and host is not None:
        threshold = cfg.gate_threshold if cfg.gate_threshold != "auto" else threshold_chooser(lm, cfg, gate_val, label, log)
        gate = fit_gate(lm.model, lm.tokenizer, host, data.target + contrast_data.target, data.retain, cfg.gate_neurons,
                        threshold, span=cfg.gate_span)
        log(f"{label}: gate {json.dumps(gate.to_json())}")
        return gated_finetune(lm.model, lm.tokenizer, gate, data, train, description=f"{label}: gated L{host}")
    positive = masked_finetune(lm.model, lm.tokenizer, masks, data, train, description=f"{label}: θ_pos")
    if cfg.variant != "contrastive":
        return positive
    negative = masked_finetune(lm.model, lm.tokenizer, masks, contrast_data, train, description=f"{label}: θ_neg")
    return compose(positive, negative, 1.0)
