"""NeST (Neuron Selective Tuning): tune only the target category's safety neurons.

Safety neurons are found on the train split (target-category harmful vs as many harmless
prompts), clustered, and tuned toward refusal replies with the same retain data and
steps as C-Δθ but NeST's own learning rate (``NestConfig.lr``; ``cdelta.baselines.nest``);
the scale k of the update is chosen on the validation split with C-Δθ's rule
(``cdelta.compare.tuning``). Options: any ``RunConfig`` field (``steps``, ``k``,
``judge``...) and ``nest.<field>`` for ``NestConfig`` (``nest.z_threshold``,
``nest.max_neurons``, ``nest.n_clusters``, ``nest.tie``, ``nest.lr``).
"""

from __future__ import annotations

from dataclasses import replace

from cdelta.baselines.nest import NestConfig, find_safety_neurons, nest_delta
from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.tuning import cached_edit, method_config, probe_prompts, refusal_edit_data, run_config, scale_on_val, scaled_result
from cdelta.edit.delta import Delta
from cdelta.edit.train import train_config
from cdelta.models.architecture import architecture_of
from cdelta.stages import fingerprint


def fit(context: MethodContext) -> MethodResult:
    """Safety neurons on train, NeST tuning, k on val."""
    cfg = run_config(context)
    nest = method_config(NestConfig, context, "nest.")
    lm = context.lm
    data = refusal_edit_data(context, cfg)
    target, harmless = probe_prompts(context)
    train = replace(train_config(cfg), lr=nest.lr)
    key = {"model_sha256": lm.weights_sha256, "category": context.category, "nest": vars(nest), "train": vars(train),
           "probe": [target, harmless], "data": fingerprint([data.target, data.retain])}

    def build() -> tuple[Delta, dict]:
        neurons = find_safety_neurons(lm.model, lm.tokenizer, target, harmless, nest)
        context.log(f"nest: {len(neurons.ids())} neurons in {neurons.n_clusters} clusters")
        return nest_delta(lm.model, lm.tokenizer, neurons, data, train, tie=nest.tie), neurons.to_dict()

    raw, summary = cached_edit(context, "nest-edit", key, build)
    k_info = scale_on_val(context, cfg, raw, {"edit": fingerprint(key)})
    n_neurons, n_clusters = len(summary["neurons"]), summary["n_clusters"]
    info = {"n_neurons": n_neurons, "n_clusters": n_clusters, "neurons_by_layer": _by_layer(summary["neurons"]),
            "trained_params": (n_clusters if nest.tie else n_neurons) * 3 * architecture_of(lm.model).d_model, "nest": vars(nest)}
    return scaled_result(context, raw, k_info, info)


def _by_layer(ids: list[str]) -> dict[str, int]:
    """Count of neuron ids per layer (``{"L12": 5, ...}``)."""
    counts: dict[str, int] = {}
    for node in ids:
        layer = node.partition(".")[0]
        counts[layer] = counts.get(layer, 0) + 1
    return counts


METHOD = Method("nest", "NeST: tune only clustered safety neurons (shared per-cluster updates), k chosen on val", fit)
