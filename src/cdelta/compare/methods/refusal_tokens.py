"""Refusal tokens (Jain et al. 2024): one new vocabulary token per harm category (only the
new output rows train); at generation time the target token's probability above a
validation-chosen threshold triggers a scripted refusal, otherwise the tokens are
suppressed (runtime hooks, ``cdelta.baselines.refusal_tokens``).

Option: ``refusal_token_kwargs`` (passed to ``fit_refusal_tokens``, e.g. ``{"l2": 0.1}``).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached, param_count, prompts_digest

TOKENS_FILE = "refusal_tokens.safetensors"


def fit(context: MethodContext) -> MethodResult:
    """Fit (or reload) the token rows and thresholds; evaluate the extended copy with the rule for the target."""
    from cdelta.baselines.refusal_tokens import RefusalTokens, fit_refusal_tokens

    kwargs = dict(context.options.get("refusal_token_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "refusal_token_kwargs": kwargs,
           "prompts": prompts_digest(context.prompts)}

    def compute(path):
        context.log("refusal-tokens: training one token per category (train split; thresholds by F1 on val)")
        tokens = fit_refusal_tokens(context.lm, context.prompts, seed=context.seed, **kwargs)
        tokens.save(path)
        return tokens

    tokens = cached(context.out_dir, "refusal-tokens", key, TOKENS_FILE, compute, RefusalTokens.load, context.log, context.refit)
    extended = tokens.extended_copy(context.lm.model)
    target = tokens.info["per_category"][context.category]
    info = {
        "threshold": tokens.thresholds[context.category],
        "token_val_auc": target["val"]["auc"],
        "token_val_f1": target["val"]["f1"],
        "token_val_recall": target["val"]["recall"],
        "token_val_false_positive_rate": target["val"]["false_positive_rate"],
        **tokens.to_json(),
    }
    return MethodResult(
        model=extended,
        params_touched=param_count(extended) - param_count(context.lm.model),
        hooks=lambda model: tokens.attach(model, [context.category]),
        info=info,
    )


METHOD = Method("refusal-tokens", "refusal tokens: a new token per category (new output rows only); its probability above a val threshold triggers a scripted refusal (runtime rule)", fit)
