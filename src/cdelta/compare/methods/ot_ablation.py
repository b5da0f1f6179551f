"""OT refusal ablation (Nanfack et al. 2026): PCA-projected Gaussian optimal transport at 1–2 layers.

Runtime hooks (the map has no exact weight form, see ``cdelta.baselines.ot``), so
``params_touched`` is 0. Fits on the train split, chooses layer(s) and ``k`` on the
validation split; cached as ``ot.safetensors`` in the method's directory.

Options: ``ot_mode`` = ``auto`` (default: ``ablate`` — harmful → harmless, the paper — when
the base refuses at least a quarter of harmful validation prompts, else ``induce`` — own
replies → refusal replies on the target category's prompts), ``ablate`` or ``induce``;
``ot_kwargs`` (passed to ``fit_ot``, e.g. ``{"ks": [16], "layers": [12]}``).
"""

from __future__ import annotations

from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import cached_with_status, prompts_digest, reused_seconds
from cdelta.errors import CdeltaError

OT_FILE = "ot.safetensors"


def fit(context: MethodContext) -> MethodResult:
    """Fit (or reload) the OT maps; the result applies them with hooks."""
    from cdelta.baselines.ot import MODES, OTFit, fit_ot

    mode = str(context.options.get("ot_mode", "auto"))
    if mode not in ("auto", *MODES):
        raise CdeltaError(f"unknown ot_mode {mode!r}", f"use --option ot_mode=auto|{'|'.join(MODES)}")
    kwargs = dict(context.options.get("ot_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "category": context.category, "mode": mode,
           "ot_kwargs": kwargs, "prompts": prompts_digest(context.prompts)}

    def compute(path):
        context.log(f"ot-ablation: fitting Gaussian OT maps, mode {mode} (train split; layers and k chosen on val)")
        fitted = fit_ot(context.lm, context.prompts, mode=mode, category=context.category, seed=context.seed, **kwargs)
        fitted.save(path)
        return fitted

    fitted, reused = cached_with_status(context.out_dir, "ot", key, OT_FILE, compute, OTFit.load, context.log, context.refit)
    context.log(f"ot-ablation: mode {fitted.mode}, layers {fitted.layers}, k {fitted.maps[0].k}")
    info = {**fitted.to_json(), "reused_seconds": reused_seconds(fitted.info, reused)}
    return MethodResult(model=context.lm.model, params_touched=0, hooks=fitted.hooks, info=info)


METHOD = Method(
    "ot-ablation",
    "Gaussian optimal-transport map of residual activations (PCA subspace) at 1-2 mid layers (runtime hooks; removes refusal, or induces it on a non-refusing base)",
    fit,
)
