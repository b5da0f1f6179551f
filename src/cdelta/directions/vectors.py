"""Residual-stream activations and refusal directions (difference of means, PCA).

Conventions used throughout ``cdelta.directions`` and the baselines built on it (``cdelta.baselines``):

* "layer ``L``" means the residual stream **after** decoder layer ``L`` (the output of
  ``decoder_layers(model)[L]``, i.e. ``hidden_states[L + 1]`` in transformers terms);
* prompts go through the chat template with left padding (``encode_chat``), and
  position ids are derived from the attention mask exactly as ``model.generate`` does,
  so activations collected here match those seen during generation;
* a *position* is ``"mean"`` (mean over the prompt's real tokens, padding excluded) or a
  negative int (``-1`` = last prompt token, where the reply starts; ``-2`` the one
  before, ...); for teacher-forced replies it is ``"reply_mean"`` (mean over the
  positions that predict reply tokens) or ``"reply_first"`` (the last prompt token).

Two recipes give a refusal direction ``r`` (a raw, un-normalized vector):

* ``"harmful-harmless"`` (Arditi et al. 2024): mean activation on harmful prompts minus
  mean activation on harmless prompts, at a prompt position;
* ``"reply"`` (for models that do not refuse, e.g. SmolLM2): mean activation over the
  tokens of a project-written refusal reply minus mean activation over the model's own
  greedy reply, both teacher-forced after the same prompts.

``fit_refusal_direction`` picks the layer and position by a score on the validation
split (see its docstring and docs/baselines.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cdelta.data.prompts import HARMLESS, PromptSet
from cdelta.errors import CdeltaError
from cdelta.models.architecture import architecture_of, decoder_layers
from cdelta.models.chat import encode_chat

Position = int | str
PROMPT_POSITIONS = ("mean",)
REPLY_POSITIONS = ("reply_mean", "reply_first")
RECIPES = ("harmful-harmless", "reply")


# --------------------------------------------------------------------------- hooks


def _hidden(output) -> torch.Tensor:
    """The hidden-state tensor of a decoder layer's output (tensor or tuple)."""
    return output[0] if isinstance(output, tuple) else output


@contextmanager
def capture_residuals(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Forward hooks storing the residual stream after each of ``layers``.

    Yields a dict ``layer -> tensor [batch, seq, d_model]`` overwritten by every forward
    pass (detached, model dtype). The hooks are removed on exit, also on error.
    """
    blocks = decoder_layers(model)
    store: dict[int, torch.Tensor] = {}
    handles = []

    def make(layer: int):
        def hook(_module, _args, output):
            store[layer] = _hidden(output).detach()

        return hook

    try:
        for layer in layers:
            handles.append(blocks[layer].register_forward_hook(make(layer)))
        yield store
    finally:
        for handle in handles:
            handle.remove()


def generation_position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for a left-padded batch, as ``model.generate`` builds them."""
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 0)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the sequence of ``hidden`` [batch, seq, d] where ``mask`` [batch, seq] is set."""
    if mask is None:
        return hidden.float().mean(1)
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def _all_layers(model: torch.nn.Module, layers: Sequence[int] | None) -> list[int]:
    n = architecture_of(model).n_layers
    chosen = list(range(n)) if layers is None else list(layers)
    bad = [layer for layer in chosen if not 0 <= layer < n]
    if bad:
        raise CdeltaError(f"layers {bad} out of range for a {n}-layer model", f"use layers 0..{n - 1}")
    return chosen


def _check_positions(positions: Sequence[Position], allowed: tuple[str, ...]) -> None:
    for pos in positions:
        if isinstance(pos, int):
            if pos >= 0 or "reply_mean" in allowed:
                raise CdeltaError(f"bad position {pos!r}", f"use one of {allowed} or a negative prompt index (-1 = last token)")
        elif pos not in allowed:
            raise CdeltaError(f"bad position {pos!r}", f"use one of {allowed}" + (" or a negative int" if "mean" in allowed else ""))


@torch.no_grad()
def collect_prompt_activations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] = ("mean",),
    batch_size: int = 16,
) -> dict[Position, torch.Tensor]:
    """Residual activations on chat-formatted prompts.

    Returns ``{position: tensor [len(layers), len(prompts), d_model]}`` (float32, CPU),
    layers in the order given (all layers when None). ``"mean"`` averages over the
    prompt's real tokens (left padding excluded); ``-k`` is the k-th token from the end.
    """
    _check_positions(positions, PROMPT_POSITIONS)
    layers = _all_layers(model, layers)
    device = next(model.parameters()).device
    out: dict[Position, list[torch.Tensor]] = {pos: [] for pos in positions}
    with capture_residuals(model, layers) as store:
        for start in range(0, len(prompts), batch_size):
            batch = encode_chat(tokenizer, prompts[start : start + batch_size], device)
            mask = batch["attention_mask"]
            model.get_decoder()(**batch, position_ids=generation_position_ids(mask), use_cache=False)
            for pos in positions:
                per_layer = []
                for layer in layers:
                    h = store[layer]
                    per_layer.append((masked_mean(h, mask) if pos == "mean" else h[:, pos].float()).cpu())
                out[pos].append(torch.stack(per_layer))
    return {pos: torch.cat(chunks, dim=1) for pos, chunks in out.items()}


@torch.no_grad()
def collect_reply_activations(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    replies: list[str],
    layers: Sequence[int] | None = None,
    positions: Sequence[str] = ("reply_mean",),
    max_reply_tokens: int = 24,
    batch_size: int = 16,
) -> dict[str, torch.Tensor]:
    """Residual activations with ``replies`` teacher-forced after ``prompts``.

    ``"reply_mean"``: mean over the positions whose next token is a reply token (the last
    prompt token through the second-to-last reply token); ``"reply_first"``: the last
    prompt token. Replies are cut at ``max_reply_tokens``. Returns
    ``{position: tensor [len(layers), len(prompts), d_model]}`` (float32, CPU).
    """
    from cdelta.edit.batches import build_reply_batch

    _check_positions(positions, REPLY_POSITIONS)
    layers = _all_layers(model, layers)
    device = next(model.parameters()).device
    out: dict[str, list[torch.Tensor]] = {pos: [] for pos in positions}
    with capture_residuals(model, layers) as store:
        for start in range(0, len(prompts), batch_size):
            batch = build_reply_batch(
                tokenizer, prompts[start : start + batch_size], replies[start : start + batch_size], max_reply_tokens
            ).to(device)
            model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
            rows = torch.arange(batch.input_ids.shape[0], device=device)
            for pos in positions:
                per_layer = []
                for layer in layers:
                    h = store[layer]
                    value = masked_mean(h, batch.reply_mask) if pos == "reply_mean" else h[rows, batch.first_reply].float()
                    per_layer.append(value.cpu())
                out[pos].append(torch.stack(per_layer))
    return {pos: torch.cat(chunks, dim=1) for pos, chunks in out.items()}


# ---------------------------------------------------------------------- directions


def mean_difference(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """``mean(positive) − mean(negative)`` over the sample axis (-2): [..., n, d] -> [..., d]."""
    return positive.float().mean(-2) - negative.float().mean(-2)


def pca_direction(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """First principal direction of paired differences, scaled like the mean difference.

    Samples are paired by index (the shorter side is cycled when the counts differ);
    the direction is the first right singular vector of the *uncentered* differences
    [..., n, d], signed to agree with the mean difference and scaled by the mean
    difference's component along it. Works per layer on [layers, n, d] inputs.
    """
    n = max(positive.shape[-2], negative.shape[-2])
    pos = positive.float()[..., torch.arange(n) % positive.shape[-2], :]
    neg = negative.float()[..., torch.arange(n) % negative.shape[-2], :]
    diffs = pos - neg
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    top = vh[..., 0, :]
    along = (diffs.mean(-2) * top).sum(-1, keepdim=True)
    return top * along


def direction_from(positive: torch.Tensor, negative: torch.Tensor, method: str = "mean") -> torch.Tensor:
    """``mean_difference`` (method ``"mean"``) or ``pca_direction`` (``"pca"``)."""
    if method == "mean":
        return mean_difference(positive, negative)
    if method == "pca":
        return pca_direction(positive, negative)
    raise CdeltaError(f"unknown direction method {method!r}", "use 'mean' or 'pca'")


def unit(vector: torch.Tensor) -> torch.Tensor:
    """``vector / ‖vector‖`` in float32."""
    v = vector.float()
    return v / v.norm().clamp_min(1e-12)


@dataclass
class Direction:
    """A refusal direction in the residual stream after decoder layer ``layer``.

    ``vector`` is raw (its norm is the size of the mean shift; ActAdd with alpha 1
    adds exactly this vector). ``scores`` holds the validation score of every
    candidate (layer, position) that was considered.
    """

    vector: torch.Tensor
    layer: int
    position: Position
    recipe: str
    method: str = "mean"
    selection: str = "induce"
    scores: list[dict] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    @property
    def unit(self) -> torch.Tensor:
        return unit(self.vector)

    @property
    def norm(self) -> float:
        return float(self.vector.float().norm())

    def to_json(self) -> dict:
        meta = asdict(self)
        meta.pop("vector")
        return {**meta, "norm": self.norm}

    def save(self, path: Path) -> None:
        """Vector and metadata in one safetensors file."""
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"vector": self.vector.float().contiguous()}, str(path), metadata={"direction": json.dumps(self.to_json(), default=str)})

    @classmethod
    def load(cls, path: Path) -> Direction:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["direction"])
            vector = handle.get_tensor("vector")
        meta.pop("norm", None)
        return cls(vector=vector, **meta)


# ------------------------------------------------------------------------ scoring


@torch.no_grad()
def reply_logprob(
    model: torch.nn.Module,
    tokenizer,
    prompts: list[str],
    replies: list[str],
    max_reply_tokens: int = 24,
    batch_size: int = 16,
) -> float:
    """Mean over prompts of the mean per-token log-probability of ``replies`` (teacher-forced)."""
    from cdelta.edit.batches import build_reply_batch, reply_logits, reply_targets

    device = next(model.parameters()).device
    per_prompt: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        batch = build_reply_batch(tokenizer, prompts[start : start + batch_size], replies[start : start + batch_size], max_reply_tokens).to(device)
        logprobs = F.log_softmax(reply_logits(model, batch), -1)
        token_lp = logprobs.gather(-1, reply_targets(batch).unsqueeze(-1)).squeeze(-1)
        counts = batch.reply_mask.sum(1).tolist()
        per_prompt += [chunk.mean() for chunk in torch.split(token_lp, counts)]
    return float(torch.stack(per_prompt).mean())


@torch.no_grad()
def first_token_kl(model: torch.nn.Module, tokenizer, prompts: list[str], reference_logprobs: torch.Tensor, batch_size: int = 16) -> float:
    """Mean KL(reference ‖ model) of the first reply token's distribution, in nats
    (``evaluate.first_token_kl`` of the model's ``next_token_logprobs`` on ``prompts``)."""
    from cdelta.evaluate import first_token_kl as kl_of_logprobs
    from cdelta.evaluate import next_token_logprobs

    return kl_of_logprobs(reference_logprobs, next_token_logprobs(model, tokenizer, prompts, batch_size))


def base_refusal_rate(lm, prompts: list[str], max_new_tokens: int = 16, judge: str = "classifier") -> float:
    """Fraction of ``prompts`` the unmodified model refuses (greedy, judged)."""
    from cdelta.generation import generate
    from cdelta.judge import get_judge, judge_batch

    completions = generate(lm.model, lm.tokenizer, prompts, max_new_tokens, progress=False)
    verdicts = judge_batch(get_judge(judge), prompts, completions)
    return sum(verdicts) / max(1, len(verdicts))


def refusal_replies_for(prompts: PromptSet, seed: int = 0) -> list[str]:
    """One project refusal reply per prompt, in prompt order (generic pool for non-harm kinds)."""
    from cdelta.edit.data import refusal_pairs

    by_id: dict[str, str] = {}
    for category in prompts.categories():
        subset = prompts.filter(category=category)
        pool = category if subset.prompts[0].kind == "harmful" else "generic"
        for prompt, (_, reply) in zip(subset, refusal_pairs(subset, pool, seed)):
            by_id[prompt.id] = reply
    return [by_id[p.id] for p in prompts]


def default_candidate_layers(n_layers: int) -> list[int]:
    """Layers searched by default: the middle of the network, ``[0.2 n, 0.8 n)`` (Arditi et al. skip the last 20%)."""
    return list(range(int(0.2 * n_layers), max(int(0.2 * n_layers) + 1, int(0.8 * n_layers))))


def _sample_harmful(prompts: PromptSet, split: str, per_category: int, seed: int) -> PromptSet:
    chosen = []
    harmful = prompts.filter(split=split, kind="harmful")
    for category in harmful.categories():
        chosen += harmful.filter(category=category).sample(per_category, seed).prompts
    return PromptSet(f"{prompts.name}:{split}:harmful", chosen)


def validation_samples(prompts: PromptSet, n_val: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """``n_val`` harmful val-split prompts spread over the harm categories, and ``n_val`` harmless ones."""
    n_categories = max(1, len(prompts.filter(kind="harmful").categories()))
    val_harmful = _sample_harmful(prompts, "val", -(-n_val // n_categories), seed).sample(n_val, seed)
    val_harmless = prompts.filter(split="val", kind=HARMLESS).sample(n_val, seed)
    if not len(val_harmful) or not len(val_harmless):
        raise CdeltaError("the validation split needs harmful and harmless prompts", "use a prompt set with val-split prompts of both kinds")
    return val_harmful, val_harmless


def fit_refusal_direction(
    lm,
    prompts: PromptSet,
    seed: int = 0,
    recipe: str = "auto",
    method: str = "mean",
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] | None = None,
    alpha: float = 1.0,
    n_train_per_category: int = 8,
    n_train_harmless: int = 16,
    n_val: int = 16,
    max_reply_tokens: int = 24,
    kl_max: float = 0.1,
    refusing_rate: float = 0.25,
    progress: bool = False,
) -> Direction:
    """Fit a refusal direction on the train split and pick (layer, position) on the validation split.

    Data (train split): ``n_train_per_category`` harmful prompts per harm category and
    ``n_train_harmless`` harmless prompts.

    * ``recipe="harmful-harmless"``: r = mean act(harmful) − mean act(harmless) at each
      candidate prompt position (default ``-1 … -5`` and ``"mean"``);
    * ``recipe="reply"``: r = mean act(refusal reply) − mean act(own reply) over the
      same prompts (both kinds), position ``"reply_mean"`` by default;
    * ``recipe="auto"``: ``"harmful-harmless"`` if the base model refuses at least
      ``refusing_rate`` of ``n_val`` harmful validation prompts (greedy, classifier judge;
      the rule ``fit_ot`` uses), else ``"reply"``.

    Selection (validation split; ``n_val`` harmless and ``n_val`` harmful prompts, each
    with a project refusal reply). ``RL(prompts)`` is the mean per-token log-probability
    of the refusal replies, teacher-forced:

    * ``induce`` = RL(harmless | ActAdd(alpha·r at layer)) − RL(harmless | base);
    * ``bypass`` = RL(harmful | ablate r̂ everywhere) − RL(harmful | base);
    * ``kl``     = first-token KL(base ‖ ablated) on the harmless prompts.

    If the base model refuses (``selection="bypass"``, the Arditi et al. rule), keep
    candidates with ``kl < kl_max`` and ``induce > 0`` and take the lowest ``bypass``.
    ``bypass`` is scored for every candidate, ``induce`` and ``kl`` only in order of
    ``bypass`` until the first eligible one: the same pick as scoring all three, for about
    a third of the forward passes (rows never reached have no ``induce``/``kl``);
    otherwise (``selection="induce"``: there is no refusal to bypass) take the highest
    ``induce``. Candidate layers default to ``default_candidate_layers``.
    """
    from cdelta.directions.hooks import ablation_hooks, actadd_hooks

    model, tokenizer = lm.model, lm.tokenizer
    arch = architecture_of(model)
    started = time.perf_counter()
    layers = default_candidate_layers(arch.n_layers) if layers is None else _all_layers(model, layers)

    val_harmful, val_harmless = validation_samples(prompts, n_val, seed)

    base_rate = None
    if recipe == "auto":
        base_rate = base_refusal_rate(lm, val_harmful.texts())
        recipe = "harmful-harmless" if base_rate >= refusing_rate else "reply"
    if recipe not in RECIPES:
        raise CdeltaError(f"unknown recipe {recipe!r}", f"use one of: auto, {', '.join(RECIPES)}")
    selection = "bypass" if recipe == "harmful-harmless" else "induce"

    train_harmful = _sample_harmful(prompts, "train", n_train_per_category, seed)
    train_harmless = prompts.filter(split="train", kind=HARMLESS).sample(n_train_harmless, seed)
    if recipe == "harmful-harmless":
        positions = list(positions or (-1, -2, -3, -4, -5, "mean"))
        pos_acts = collect_prompt_activations(model, tokenizer, train_harmful.texts(), layers, positions)
        neg_acts = collect_prompt_activations(model, tokenizer, train_harmless.texts(), layers, positions)
    else:
        from cdelta.edit.data import own_reply_pairs

        positions = list(positions or ("reply_mean",))
        train = train_harmful + train_harmless
        texts, refusals = train.texts(), refusal_replies_for(train, seed)
        own = [reply for _, reply in own_reply_pairs(model, tokenizer, train, max_reply_tokens, progress)]
        pos_acts = collect_reply_activations(model, tokenizer, texts, refusals, layers, positions, max_reply_tokens)
        neg_acts = collect_reply_activations(model, tokenizer, texts, own, layers, positions, max_reply_tokens)

    harmless_texts, harmless_refusals = val_harmless.texts(), refusal_replies_for(val_harmless, seed)
    harmful_texts, harmful_refusals = val_harmful.texts(), refusal_replies_for(val_harmful, seed)
    base_induce = reply_logprob(model, tokenizer, harmless_texts, harmless_refusals, max_reply_tokens)
    if selection == "bypass":
        from cdelta.evaluate import next_token_logprobs

        base_bypass = reply_logprob(model, tokenizer, harmful_texts, harmful_refusals, max_reply_tokens)
        reference = next_token_logprobs(model, tokenizer, harmless_texts)

    vectors: dict[tuple[int, Position], torch.Tensor] = {}
    for pos in positions:
        per_layer = direction_from(pos_acts[pos], neg_acts[pos], method)
        vectors.update({(layer, pos): per_layer[i] for i, layer in enumerate(layers)})
    scores = [{"layer": layer, "position": pos, "norm": float(r.norm())} for (layer, pos), r in vectors.items()]

    def vector(row: dict) -> torch.Tensor:
        return vectors[(row["layer"], row["position"])]

    def score_induce(row: dict) -> None:
        with actadd_hooks(model, vector(row), row["layer"], alpha):
            row["induce"] = reply_logprob(model, tokenizer, harmless_texts, harmless_refusals, max_reply_tokens) - base_induce

    if selection == "induce":
        for row in scores:
            score_induce(row)
        best = max(scores, key=lambda s: s["induce"])
    else:
        for row in scores:
            with ablation_hooks(model, vector(row)):
                row["bypass"] = reply_logprob(model, tokenizer, harmful_texts, harmful_refusals, max_reply_tokens) - base_bypass
        by_bypass = sorted(scores, key=lambda s: s["bypass"])
        best = by_bypass[0]  # the fallback when no candidate is eligible
        for row in by_bypass:
            score_induce(row)
            with ablation_hooks(model, vector(row)):
                row["kl"] = first_token_kl(model, tokenizer, harmless_texts, reference)
            if row["kl"] < kl_max and row["induce"] > 0:
                best = row
                break
    info = {
        "seed": seed,
        "alpha_scored": alpha,
        "n_train_harmful": len(train_harmful),
        "n_train_harmless": len(train_harmless),
        "n_val_harmful": len(val_harmful),
        "n_val_harmless": len(val_harmless),
        "base_refusal_rate_val_harmful": base_rate,
        "seconds": time.perf_counter() - started,
    }
    return Direction(
        vector=vectors[(best["layer"], best["position"])].clone(),
        layer=best["layer"],
        position=best["position"],
        recipe=recipe,
        method=method,
        selection=selection,
        scores=scores,
        info=info,
    )

