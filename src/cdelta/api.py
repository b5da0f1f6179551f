"""Python API mirroring the CLI: ``load_model``, ``localize``, ``edit``, ``export``, ``evaluate``.

Example (see docs/usage.md; ``tests/test_api_example.py`` runs it)::

    import cdelta

    lm = cdelta.load_model("smollm2-135m")
    found = cdelta.localize(lm, "cybercrime", n_pairs=8, faithfulness=False)
    circuit = found.circuit.select_spec("params:0.02", lm.model)
    delta = cdelta.edit(lm, circuit, "cybercrime", steps=5)
    cdelta.export(lm, delta, "runs/api-example", category="cybercrime")
    results = cdelta.evaluate("runs/api-example/checkpoint", limit_per_category=2)
"""

from __future__ import annotations

from pathlib import Path

from cdelta.config import RunConfig
from cdelta.data.builtin import load_builtin
from cdelta.data.prompts import PromptSet
from cdelta.edit.data import RETAIN_REPLY_TOKENS, own_reply_pairs, refusal_edit_data
from cdelta.edit.delta import Delta, compose
from cdelta.edit.export import export_edit
from cdelta.edit.train import masked_finetune, train_config
from cdelta.evaluate import EvalConfig, evaluate_model
from cdelta.models.loading import LoadedModel, load_model

__all__ = ["load_model", "localize", "edit", "export", "evaluate"]


def localize(lm: LoadedModel, category: str, prompts: PromptSet | None = None, **options):
    """EAP-IG circuit of ``lm``'s refusal of ``category`` (options as ``circuits.localize.localize``)."""
    from cdelta.circuits.localize import localize as _localize

    return _localize(lm, category, prompts or load_builtin(), **options)


def edit(lm: LoadedModel, circuit, category: str, k: float = 1.0, prompts: PromptSet | None = None, **settings) -> Delta:
    """ΔθC = k · M_C ⊙ (θ′ − θ): a masked fine-tune of ``circuit``'s parameters toward refusing ``category``.

    ``settings`` are ``RunConfig`` fields (steps, lr, retain_weight, retain_* counts, seed, ...).
    Returns a dense delta per parameter, zero outside the circuit.
    """
    cfg = RunConfig(category=[category], **settings)
    data = refusal_edit_data(prompts or load_builtin(), cfg, lambda retain: own_reply_pairs(lm.model, lm.tokenizer, retain, RETAIN_REPLY_TOKENS))
    return compose(masked_finetune(lm.model, lm.tokenizer, circuit.param_masks(lm.model), data, train_config(cfg)), None, k)


def export(lm: LoadedModel, delta: Delta, out_dir: str | Path, **manifest) -> dict:
    """Write ``out_dir/checkpoint`` (drop-in HF model) and ``out_dir/delta.safetensors``."""
    return export_edit(lm, delta, Path(out_dir), manifest)


def evaluate(
    model: str | LoadedModel,
    prompts: list[str] | None = None,
    reference: str | LoadedModel | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    device_map: str | None = None,
    **settings,
) -> dict:
    """Refusal per set and category with 95% intervals, plus utility (``EvalConfig`` fields as settings,
    e.g. ``backend="auto"`` for vLLM). ``device``/``dtype``/``device_map`` apply to models given by name."""
    from cdelta.data.registry import load_source

    placement = {"device": device, "dtype": dtype, "device_map": device_map}
    lm = load_model(model, **placement) if isinstance(model, str) else model
    ref = load_model(reference, **placement) if isinstance(reference, str) else reference
    sets = [load_source(name) for name in (prompts or ["builtin"])]
    return evaluate_model(lm.model, lm.tokenizer, sets, EvalConfig(**settings), (ref.model, ref.tokenizer) if ref else None)
