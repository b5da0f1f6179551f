"""Detect-then-route: a linear probe for the target category on pooled prompt activations;
flagged prompts get a scripted refusal (runtime hooks, ``cdelta.baselines.probes``).

Option: ``probe_kwargs`` (passed to ``fit_probe_router``, e.g. ``{"layers": [8, 10],
"n_permutations": 50}``). ``info`` carries the probe's validation metrics and the three
controls (label permutation, null labels, held-out category) next to the refusal table.
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached, prompts_digest

ROUTER_FILE = "probe_router.safetensors"


def probe_summary(info: dict) -> dict:
    """The headline numbers of a router's ``info``: validation metrics of the probe and its controls."""
    controls = info["controls"]
    return {
        "probe_val_auc": info["val"]["auc"],
        "probe_val_f1": info["val"]["f1"],
        "probe_val_recall": info["val"]["recall"],
        "probe_val_false_positive_rate": info["val"]["false_positive_rate"],
        "permutation_val_auc_mean": controls["permutation"]["val_auc_mean"],
        "permutation_train_balanced_accuracy_mean": controls["permutation"]["train_balanced_accuracy_mean"],
        "permutation_p_value": controls["permutation"]["p_value"],
        "null_labels_val_auc": controls["null_labels"].get("val_auc"),
        "null_labels_train_balanced_accuracy": controls["null_labels"].get("train_balanced_accuracy"),
        "held_out_recall_mean": controls["held_out_category"]["held_out_recall_mean"],
        "seen_recall_mean": controls["held_out_category"]["seen_recall_mean"],
    }


def fit(context: MethodContext) -> MethodResult:
    """Fit (or reload) the probe, its layer/position and threshold, and the controls."""
    from cdelta.baselines.probes import ProbeRouter, fit_probe_router

    kwargs = dict(context.options.get("probe_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "category": context.category,
           "probe_kwargs": kwargs, "prompts": prompts_digest(context.prompts)}

    def compute(path):
        context.log(f"probe-router: fitting the {context.category} probe (train split; layer, position and threshold on val; controls)")
        router = fit_probe_router(context.lm, context.prompts, context.category, seed=context.seed, **kwargs)
        router.save(path)
        return router

    router = cached(context.out_dir, "probe-router", key, ROUTER_FILE, compute, ProbeRouter.load, context.log, context.refit)
    info = {**probe_summary(router.info), **router.to_json()}
    return MethodResult(model=context.lm.model, params_touched=0, hooks=router.attach, info=info)


METHOD = Method("probe-router", "detect-then-route: a linear probe on prompt activations flags the category; flagged prompts get a scripted refusal (runtime hooks)", fit)
