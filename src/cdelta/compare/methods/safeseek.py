"""SafeSeek: optimize masks over heads and MLP neurons to find the target category's safety
circuit, then Safety Circuit Tuning (a masked fine-tune of only its parameters).

The masks are fitted on train-split target prompts (paired with as many harmless ones in
``gap`` mode, for a base that refuses nothing; see ``cdelta.baselines.safeseek``); the
tuning uses C-Δθ's retain data and settings, and k is chosen on the validation split
(``cdelta.compare.tuning``). Options: any ``RunConfig`` field and
``safeseek.<field>`` for ``SafeSeekConfig`` (``safeseek.steps``, ``safeseek.mode``,
``safeseek.head_fraction``, ``safeseek.neuron_fraction``, ``safeseek.sufficiency_weight``...).
"""

from __future__ import annotations

import json
from pathlib import Path

from cdelta.baselines.safeseek import SafeSeekConfig, SafetyCircuit, circuit_tuning_delta, find_circuit
from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached
from cdelta.compare.tuning import cached_edit, method_config, probe_prompts, refusal_edit_data, run_config, scale_on_val, scaled_result
from cdelta.edit.delta import Delta
from cdelta.edit.train import train_config
from cdelta.io import atomic_write_json
from cdelta.models.architecture import architecture_of
from cdelta.stages import fingerprint


def fit(context: MethodContext) -> MethodResult:
    """Circuit by mask optimization on train, circuit tuning, k on val."""
    cfg = run_config(context)
    seek = method_config(SafeSeekConfig, context, "safeseek.")
    lm = context.lm
    arch = architecture_of(lm.model)
    target, harmless = probe_prompts(context)
    circuit_key = {"model_sha256": lm.weights_sha256, "category": context.category, "safeseek": vars(seek), "probe": [target, harmless]}

    def compute(path: Path) -> SafetyCircuit:
        circuit = find_circuit(lm.model, lm.tokenizer, target, harmless, seek)
        atomic_write_json(path, circuit.to_dict())
        return circuit

    circuit = cached(context.out_dir, "safeseek-circuit", circuit_key, "circuit.json", compute,
                     lambda path: SafetyCircuit.from_dict(json.loads(path.read_text()), arch), context.log, context.refit)
    context.log(f"safeseek ({circuit.meta['mode']} mode): {circuit.n_heads} heads, {circuit.n_neurons} neurons")
    data = refusal_edit_data(context, cfg)
    key = {"circuit": fingerprint(circuit.to_dict()), "train": vars(train_config(cfg)), "data": fingerprint([data.target, data.retain])}

    def build() -> tuple[Delta, dict]:
        return circuit_tuning_delta(lm.model, lm.tokenizer, circuit, data, train_config(cfg)), {}

    raw, _ = cached_edit(context, "safeseek-edit", key, build)
    k_info = scale_on_val(context, cfg, raw, {"edit": fingerprint(key)})
    info = {"mode": circuit.meta["mode"], "base_refusal_fraction": circuit.meta["base_refusal_fraction"],
            "heads": circuit.head_ids(), "n_neurons": circuit.n_neurons, "circuit_params": sum(int(m.sum()) for m in circuit.param_masks(lm.model).values()),
            "final_step": circuit.meta["history"][-1] if circuit.meta.get("history") else None, "safeseek": vars(seek)}
    return scaled_result(context, raw, k_info, info)


METHOD = Method("safeseek", "SafeSeek: mask-optimized head+neuron safety circuit, then circuit tuning, k chosen on val", fit)
