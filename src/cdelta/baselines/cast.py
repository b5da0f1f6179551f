"""CAST: conditional activation steering (Lee et al. 2025), per sequence in a batch.

A ``CastModel`` holds

* a **behaviour vector** ``v`` (the refusal direction, see ``fit_refusal_direction``),
  added as ``alpha · v`` to the residual stream after each behaviour layer, at every
  position, for the sequences whose condition fires;
* a **condition vector** ``c`` at a condition layer: the difference of means (or PCA of
  paired differences) between prompts of the target category and contrast prompts
  (other harm categories and harmless), activations averaged over the prompt tokens;
* a threshold ``θ`` and a comparator: with ``s = cos(mean_prompt_hidden, c)`` the
  condition fires when ``s > θ`` (``"larger"``) or ``s < θ`` (``"smaller"``).
  (The reference implementation names the comparator the other way round; here the
  name says which side fires.) Optionally (``condition_center``, an extension of CAST)
  the hidden state is first centred on the mean training activation ``μ``:
  ``s = cos(h − μ, c)``; without it the shared component of all prompts dominates the
  cosine.

``fit_cast`` chooses the condition layer, centring, ``θ`` and the comparator by F1 on
the validation split. ``CastModel.attach(model)`` is a context manager installing plain
forward hooks; they are removed on exit and the model is then bit-identical to the
base. The decision is made per sequence, on the prompt forward pass of each
``model.generate`` call (recognised by an empty/absent KV cache), from the
unsteered activations at the condition layer, and kept in a ``[batch]`` mask on the
hook object for that call's decoding steps. When the condition layer is at or after
a behaviour layer, the decision needs the condition layer before the behaviour layer
runs, so the prompt pass first runs the decoder (unsteered) up to the condition layer;
the prompt itself is then steered too, so firing rows behave exactly like ActAdd and
the other rows are bit-identical to the base model.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.directions.vectors import (
    Direction,
    collect_prompt_activations,
    direction_from,
    fit_refusal_direction,
    masked_mean,
)
from cdelta.errors import CdeltaError
from cdelta.evaluate import limit_per_category
from cdelta.models.architecture import architecture_of, decoder_layers

COMPARATORS = ("larger", "smaller")


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by the condition hook to end a truncated (condition-only) forward pass."""


@dataclass
class CastModel:
    """A fitted CAST configuration (see the module docstring)."""

    behavior_vector: torch.Tensor
    behavior_layers: tuple[int, ...]
    alpha: float
    condition_vector: torch.Tensor
    condition_layer: int
    threshold: float
    comparator: str = "larger"
    condition_center: torch.Tensor | None = None
    category: str = ""
    grid: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.behavior_layers = tuple(int(x) for x in self.behavior_layers)
        if self.comparator not in COMPARATORS:
            raise CdeltaError(f"unknown comparator {self.comparator!r}", "use 'larger' or 'smaller'")

    def fires(self, similarity: torch.Tensor) -> torch.Tensor:
        """Boolean mask: does the condition fire for these cosine similarities?"""
        return similarity > self.threshold if self.comparator == "larger" else similarity < self.threshold

    def similarity(self, pooled: torch.Tensor) -> torch.Tensor:
        """Cosine similarity of pooled hidden states [batch, d] (minus ``condition_center``) with the condition vector."""
        c = self.condition_vector.to(pooled.device, torch.float32)
        h = pooled.float()
        if self.condition_center is not None:
            h = h - self.condition_center.to(h.device, torch.float32)
        return torch.nn.functional.cosine_similarity(h, c.unsqueeze(0), dim=-1)

    def attach(self, model: torch.nn.Module) -> CastHooks:
        """Context manager: ``with cast.attach(model) as hooks: ...`` (``hooks.mask`` after a call)."""
        return CastHooks(self, model)

    @torch.no_grad()
    def condition_scores(self, model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Cosine similarity per prompt (unsteered model), shape [len(prompts)]."""
        acts = collect_prompt_activations(model, tokenizer, prompts, [self.condition_layer], ("mean",), batch_size)
        return self.similarity(acts["mean"][0])

    def to_json(self) -> dict:
        meta = asdict(self)
        for key in ("behavior_vector", "condition_vector", "condition_center"):
            meta.pop(key)
        meta["centered"] = self.condition_center is not None
        return meta

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {"behavior_vector": self.behavior_vector.float().contiguous(), "condition_vector": self.condition_vector.float().contiguous()}
        if self.condition_center is not None:
            tensors["condition_center"] = self.condition_center.float().contiguous()
        save_file(tensors, str(path), metadata={"cast": json.dumps(self.to_json(), default=str)})

    @classmethod
    def load(cls, path: Path) -> CastModel:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["cast"])
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta.pop("centered", None)
        return cls(**tensors, **meta)


def is_prompt_pass(kwargs: dict) -> bool:
    """Whether a model call (a forward pre-hook's kwargs) reads the prompt, not a generated token.

    True without a KV cache or with an empty one. transformers ≥ 5.24 passes the cache to
    ``forward`` as ``cache``, earlier 5.x releases as ``past_key_values``.
    """
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache is None or (hasattr(cache, "get_seq_length") and cache.get_seq_length() == 0)


class CastHooks:
    """Forward hooks implementing one ``CastModel`` on one model (use as a context manager).

    State lives on this object only: ``mask`` is the ``[batch]`` boolean decision of the
    current ``generate`` call (None before the first call), ``similarity`` the cosine
    values behind it, and ``history`` the masks of every prompt pass seen so far.
    """

    def __init__(self, cast: CastModel, model: torch.nn.Module) -> None:
        n_layers = architecture_of(model).n_layers
        bad = [layer for layer in (*cast.behavior_layers, cast.condition_layer) if not 0 <= layer < n_layers]
        if bad:
            raise CdeltaError(f"CAST layers {bad} out of range for a {n_layers}-layer model", "fit the CastModel on this model")
        self.cast, self.model = cast, model
        self.mask: torch.Tensor | None = None
        self.similarity: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []
        self._handles: list = []
        self._mode = "idle"  # idle | in_pass (decide at the condition layer) | precompute
        self._prompt_mask: torch.Tensor | None = None
        self._shift: torch.Tensor | None = None

    # -- hook bodies -----------------------------------------------------------------

    def _decide(self, hidden: torch.Tensor) -> None:
        pooled = masked_mean(hidden, self._prompt_mask)
        self.similarity = self.cast.similarity(pooled)
        self.mask = self.cast.fires(self.similarity)
        self.history.append(self.mask.detach().cpu())

    def _on_model_call(self, _module, args, kwargs):
        if not is_prompt_pass(kwargs):
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        inputs_embeds = kwargs.get("inputs_embeds")
        self._prompt_mask = kwargs.get("attention_mask")
        self.mask = None
        if self.cast.condition_layer < min(self.cast.behavior_layers):
            self._mode = "in_pass"
            return None
        self._mode = "precompute"
        try:
            self.model.get_decoder()(
                input_ids=input_ids if inputs_embeds is None else None,
                inputs_embeds=inputs_embeds,
                attention_mask=self._prompt_mask,
                position_ids=kwargs.get("position_ids"),
                use_cache=False,
            )
        except _StopForward:
            pass
        finally:
            self._mode = "idle"
        if self.mask is None:
            raise CdeltaError("CAST condition layer was not reached on the prompt pass", "attach the CastModel to the model it was fitted on")
        return None

    def _on_condition_layer(self, _module, _args, output):
        if self._mode == "precompute":
            self._decide(_hidden(output))
            raise _StopForward
        if self._mode == "in_pass":
            self._decide(_hidden(output))
            self._mode = "idle"
        return None

    def _on_behavior_layer(self, _module, _args, output):
        if self.mask is None or self._mode == "precompute":
            return None
        hidden = _hidden(output)
        if hidden.shape[0] != self.mask.shape[0]:
            raise CdeltaError(
                f"CAST mask has {self.mask.shape[0]} rows but the batch has {hidden.shape[0]}",
                "generate one sequence per prompt (no beams / num_return_sequences) with CAST attached",
            )
        if not bool(self.mask.any()):
            return None
        shift = self._shift.to(hidden.device, hidden.dtype)
        steered = torch.where(self.mask.to(hidden.device)[:, None, None], hidden + shift, hidden)
        return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered

    # -- context manager -----------------------------------------------------------

    def __enter__(self) -> CastHooks:
        blocks = decoder_layers(self.model)
        self._shift = self.cast.alpha * self.cast.behavior_vector.float()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._handles.append(blocks[self.cast.condition_layer].register_forward_hook(self._on_condition_layer))
            for layer in self.cast.behavior_layers:
                self._handles.append(blocks[layer].register_forward_hook(self._on_behavior_layer))
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mode = "idle"
        self._prompt_mask = None


def cast_generate(model: torch.nn.Module, tokenizer, cast: CastModel, prompts: list[str], **kwargs) -> list[str]:
    """``cdelta.generation.generate`` with ``cast`` attached (kwargs are passed through)."""
    from cdelta.generation import generate

    with cast.attach(model):
        return generate(model, tokenizer, prompts, **kwargs)


# ------------------------------------------------------------------------- fitting


def f1_table(scores: torch.Tensor, labels: torch.Tensor, thresholds: torch.Tensor, comparator: str) -> torch.Tensor:
    """F1 of "fires" against ``labels`` for every threshold: scores [n], labels [n] bool -> [n_thresholds]."""
    fired = scores[None, :] > thresholds[:, None] if comparator == "larger" else scores[None, :] < thresholds[:, None]
    positive = labels[None, :]
    tp = (fired & positive).sum(1).float()
    fp = (fired & ~positive).sum(1).float()
    fn = (~fired & positive).sum(1).float()
    return 2 * tp / (2 * tp + fp + fn).clamp_min(1.0)


def grid_search_condition(
    scores: torch.Tensor, labels: torch.Tensor, layers: Sequence[int], n_thresholds: int = 101
) -> list[dict]:
    """Best threshold and comparator per layer by F1; rows sorted best first.

    ``scores`` [n_layers, n] are cosine similarities on the validation prompts,
    ``labels`` [n] mark the target category. Thresholds: ``n_thresholds`` evenly spaced
    values spanning each layer's observed range. Ties go to the earlier layer, then to
    ``"larger"``, then to the lower threshold.
    """
    labels = labels.bool()
    rows = []
    for i, layer in enumerate(layers):
        s = scores[i].float()
        thresholds = torch.linspace(float(s.min()), float(s.max()), n_thresholds)
        for comparator in COMPARATORS:
            f1 = f1_table(s, labels, thresholds, comparator)
            j = int(torch.argmax(f1))
            fired = s > thresholds[j] if comparator == "larger" else s < thresholds[j]
            rows.append({
                "layer": int(layer),
                "comparator": comparator,
                "threshold": float(thresholds[j]),
                "f1": float(f1[j]),
                "recall": float((fired & labels).sum() / labels.sum().clamp_min(1)),
                "false_positive_rate": float((fired & ~labels).sum() / (~labels).sum().clamp_min(1)),
            })
    order = sorted(range(len(rows)), key=lambda k: (-rows[k]["f1"], k))
    return [rows[k] for k in order]


def condition_sets(prompts: PromptSet, category: str, split: str, lookalike: bool = False) -> tuple[PromptSet, PromptSet]:
    """(target, contrast) prompts of one split: the category vs other harm categories + harmless (+ look-alikes)."""
    if category not in prompts.filter(kind="harmful").categories():
        raise CdeltaError(f"no harmful prompts of category {category!r}", f"use one of: {', '.join(prompts.filter(kind='harmful').categories())}")
    part = prompts.filter(split=split)
    target = part.filter(category=category)
    kinds = ["harmful", HARMLESS] + ([LOOKALIKE] if lookalike else [])
    contrast = part.filter(kind=kinds, exclude_category=category)
    return target, contrast


def fit_cast(
    lm,
    prompts: PromptSet,
    category: str,
    seed: int = 0,
    behavior: Direction | None = None,
    alpha: float = 1.0,
    behavior_layers: Sequence[int] | None = None,
    condition_layers: Sequence[int] | None = None,
    method: str = "mean",
    lookalike: bool = False,
    n_contrast_per_category: int | None = 32,
    n_thresholds: int = 101,
    centers: Sequence[bool] = (False, True),
    direction_kwargs: dict | None = None,
    progress: bool = False,
) -> CastModel:
    """Fit CAST for one target category.

    * behaviour: ``behavior`` if given, else ``fit_refusal_direction(lm, prompts, seed,
      **direction_kwargs)``; applied at ``behavior_layers`` (default: the direction's
      layer) with strength ``alpha``;
    * condition vectors (train split): ``method`` ("mean" or "pca") over mean-pooled
      prompt activations of the target category vs contrast prompts (other harm
      categories and harmless, plus look-alikes if ``lookalike``), at most
      ``n_contrast_per_category`` per contrast category;
    * grid search (validation split, all target and contrast prompts): centring (each
      of ``centers``; True subtracts the mean train activation ``μ`` of target and
      contrast prompts before the cosine) × condition layer (default: every layer) ×
      comparator × ``n_thresholds`` thresholds, by F1; ties go to the first of
      ``centers``, then as in ``grid_search_condition``. ``centers=(False,)`` is plain CAST.
    """
    model, tokenizer = lm.model, lm.tokenizer
    started = time.perf_counter()
    n_layers = architecture_of(model).n_layers
    if behavior is None:
        behavior = fit_refusal_direction(lm, prompts, seed, progress=progress, **(direction_kwargs or {}))
    behavior_seconds = time.perf_counter() - started
    layers = list(range(n_layers)) if condition_layers is None else list(condition_layers)

    target, contrast = condition_sets(prompts, category, "train", lookalike)
    contrast = limit_per_category(contrast, n_contrast_per_category, seed)
    val_target, val_contrast = condition_sets(prompts, category, "val", lookalike)
    if not (len(target) and len(contrast) and len(val_target) and len(val_contrast)):
        raise CdeltaError(f"CAST for {category!r} needs target and contrast prompts in the train and val splits", "use a prompt set with all splits")
    pos = collect_prompt_activations(model, tokenizer, target.texts(), layers, ("mean",))["mean"]
    neg = collect_prompt_activations(model, tokenizer, contrast.texts(), layers, ("mean",))["mean"]
    vectors = direction_from(pos, neg, method)  # [n_layers_sel, d]
    mu = torch.cat([pos, neg], dim=1).mean(1)  # [n_layers_sel, d]

    val = val_target + val_contrast
    val_acts = collect_prompt_activations(model, tokenizer, val.texts(), layers, ("mean",))["mean"]
    labels = torch.tensor([p.category == category for p in val])
    grid = []
    for center in centers:
        acts = val_acts - mu[:, None, :] if center else val_acts
        scores = torch.nn.functional.cosine_similarity(acts, vectors[:, None, :], dim=-1)
        grid += [{**row, "center": bool(center)} for row in grid_search_condition(scores, labels, layers, n_thresholds)]
    grid = sorted(grid, key=lambda row: -row["f1"])  # stable: ties keep the order above
    best = grid[0]
    index = layers.index(best["layer"])
    info = {
        "seed": seed,
        "method": method,
        "lookalike_in_contrast": lookalike,
        "n_train_target": len(target),
        "n_train_contrast": len(contrast),
        "n_val_target": len(val_target),
        "n_val_contrast": len(val_contrast),
        "val_f1": best["f1"],
        "behavior": behavior.to_json(),
        "behavior_seconds": behavior_seconds,
        "seconds": time.perf_counter() - started,
    }
    return CastModel(
        behavior_vector=behavior.vector.clone(),
        behavior_layers=tuple(behavior_layers) if behavior_layers is not None else (behavior.layer,),
        alpha=alpha,
        condition_vector=vectors[index].clone(),
        condition_layer=best["layer"],
        threshold=best["threshold"],
        comparator=best["comparator"],
        condition_center=mu[index].clone() if best["center"] else None,
        category=category,
        grid=grid,
        info=info,
    )
