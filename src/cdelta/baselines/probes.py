"""Linear probes on prompt activations, their controls, and a detect-then-route refuser.

**Probe.** A logistic regression on pooled prompt activations at one layer (layer ``L`` =
the residual stream after decoder layer ``L``; position ``"mean"`` = mean over the
prompt's real tokens, ``-1`` = the last prompt token; see ``cdelta.directions.vectors``).
Features are standardised with the train mean/std, the loss is class-balanced binary
cross-entropy plus ``l2/2 ·‖w‖²`` on the standardised weights, minimised with full-batch
L-BFGS from zero (convex, deterministic). The fitted probe is folded back to raw
activation space: ``score(h) = w·h + b`` (a logit; ``> 0`` means "positive" for the
class-balanced fit).

**Category probe** (``fit_probe_router``): target category's harmful prompts (label 1)
against every other train prompt (other harm categories, harmless, look-alike; label 0).
The (layer, position) with the highest validation AUC is kept and the decision threshold
is the validation-F1 optimum (as CAST).

**Controls** ("Detection is cheap, routing is learned": probe accuracy alone is not
diagnostic, held-out generalisation is), all at the chosen (layer, position):

* *label permutation*: the train labels shuffled ``n_permutations`` times, probe refitted,
  scored against the true validation labels (should be at chance: AUC ≈ 0.5), with the
  train accuracy each shuffled probe reaches (memorisation) and a permutation p-value for
  the real probe's validation AUC;
* *null labels*: labels drawn per prompt from a seeded hash of its id (same positive rate
  as the target), fixed across splits; a probe trained and validated on them (chance on
  validation, typically high on train);
* *held-out category*: for every harm category ``h``, a harmful-vs-(harmless + look-alike)
  probe trained on the other harm categories only; reported: detection rate (recall at
  logit 0) on ``h``'s validation prompts vs on the seen categories' validation prompts, and
  the false-positive rate on validation harmless/look-alike prompts.

**Router.** ``ProbeRouter.attach(model)`` installs plain forward hooks that decide per
sequence on the prompt pass of every ``generate`` call (recognised, as in CAST, by an
empty or absent KV cache): the probe scores the pooled activation at its layer, and
flagged sequences get a fixed refusal reply by forcing the output logits, step by step,
to the reply's tokens (then EOS). Unflagged sequences are untouched (bit-identical to
the base); on exit every hook is removed. ``RoutedReplyHooks`` is the reusable part
(prompt-pass detection and forcing), shared with ``cdelta.baselines.refusal_tokens``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.baselines.cast import f1_table, is_prompt_pass
from cdelta.directions.vectors import Position, collect_prompt_activations, masked_mean
from cdelta.errors import CdeltaError
from cdelta.evaluate import limit_per_category
from cdelta.models.architecture import architecture_of, decoder_layers

FORCED_FLOOR = -100.0
"""Logit given to every non-forced token of a forced step (the forced token gets 0): a
near point mass whose log-probabilities stay finite, so KL-based utility metrics do too."""

PROBE_POSITIONS = ("mean", -1)


# ----------------------------------------------------------------------- fitting


@dataclass
class LinearProbe:
    """``score(h) = h @ weight + bias`` on raw activations ``h`` [n, d] -> logits [n]."""

    weight: torch.Tensor
    bias: float

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        return acts.float() @ self.weight.float() + self.bias


def fit_logistic(x: torch.Tensor, labels: torch.Tensor, l2: float = 1e-2, max_iter: int = 200) -> LinearProbe:
    """Class-balanced L2 logistic regression on ``x`` [n, d] with boolean ``labels`` [n].

    Each class carries total weight 1/2; ``l2`` penalises the standardised weights
    (``l2/2 ·‖w‖²``). Deterministic (zero start, full-batch L-BFGS).
    """
    y = labels.bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        raise CdeltaError(f"a probe needs both classes (got {n_pos} positive, {n_neg} negative)", "add prompts of the missing class")
    x = x.float()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    sample_weight = torch.where(y, 0.5 / n_pos, 0.5 / n_neg)
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        nll = F.binary_cross_entropy_with_logits(z @ w + b, y.float(), reduction="none")
        loss = (sample_weight * nll).sum() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw = (w.detach() / std).clone()
    return LinearProbe(weight=raw, bias=float(b.detach() - raw @ mean))


# ----------------------------------------------------------------------- metrics


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2."""
    y = labels.bool()
    pos, neg = scores[y].float(), scores[~y].float()
    if not len(pos) or not len(neg):
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).float() + 0.5 * (diff == 0).float()).mean())


def classification_metrics(scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Decision ``score > threshold`` against ``labels``: recall, FPR, balanced accuracy, accuracy, F1, AUC."""
    y = labels.bool()
    fired = scores.float() > threshold
    tp, fp = int((fired & y).sum()), int((fired & ~y).sum())
    fn, tn = int((~fired & y).sum()), int((~fired & ~y).sum())
    recall = tp / max(1, tp + fn)
    fpr = fp / max(1, fp + tn)
    return {
        "threshold": float(threshold),
        "recall": recall,
        "false_positive_rate": fpr,
        "balanced_accuracy": (recall + 1 - fpr) / 2,
        "accuracy": (tp + tn) / max(1, len(y)),
        "f1": 2 * tp / max(1, 2 * tp + fp + fn),
        "auc": roc_auc(scores, y),
        "n_positive": tp + fn,
        "n_negative": fp + tn,
    }


def best_f1_threshold(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Threshold maximising the F1 of ``score > threshold``; candidates are the midpoints
    between consecutive distinct scores (and one below the minimum); ties go to the lowest."""
    values = scores.float().unique()  # sorted
    candidates = torch.cat([values[:1] - 1.0, (values[1:] + values[:-1]) / 2]) if len(values) > 1 else values - 1.0
    f1 = f1_table(scores.float(), labels.bool(), candidates, "larger")
    return float(candidates[int(torch.argmax(f1))])


# ---------------------------------------------------------------------- controls


def permutation_control(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                        real_val_auc: float, n_permutations: int = 20, seed: int = 0, l2: float = 1e-2) -> dict:
    """Refit on shuffled train labels; score against the true validation labels.

    Returns mean/max validation AUC and balanced accuracy (at logit 0) over the shuffles,
    the mean train balanced accuracy (memorisation), and the permutation p-value
    ``(1 + #{AUC_perm ≥ AUC_real}) / (1 + n_permutations)``.
    """
    gen = torch.Generator().manual_seed(seed)
    val_auc, val_bacc, train_bacc = [], [], []
    for _ in range(n_permutations):
        shuffled = y_train[torch.randperm(len(y_train), generator=gen)]
        probe = fit_logistic(x_train, shuffled, l2)
        val = classification_metrics(probe.scores(x_val), y_val, 0.0)
        val_auc.append(val["auc"])
        val_bacc.append(val["balanced_accuracy"])
        train_bacc.append(classification_metrics(probe.scores(x_train), shuffled, 0.0)["balanced_accuracy"])
    return {
        "n_permutations": n_permutations,
        "val_auc_mean": sum(val_auc) / len(val_auc),
        "val_auc_max": max(val_auc),
        "val_balanced_accuracy_mean": sum(val_bacc) / len(val_bacc),
        "train_balanced_accuracy_mean": sum(train_bacc) / len(train_bacc),
        "p_value": (1 + sum(a >= real_val_auc for a in val_auc)) / (1 + n_permutations),
    }


def null_labels(ids: Sequence[str], rate: float, seed: int = 0) -> torch.Tensor:
    """Boolean label per id from a seeded hash: True with probability ``rate``, independent of content."""
    def u(prompt_id: str) -> float:
        return int.from_bytes(hashlib.sha256(f"null:{seed}:{prompt_id}".encode()).digest()[:8], "big") / 2**64

    return torch.tensor([u(i) < rate for i in ids])


def null_label_control(x_train: torch.Tensor, train_ids: Sequence[str], x_val: torch.Tensor, val_ids: Sequence[str],
                       rate: float, seed: int = 0, l2: float = 1e-2) -> dict:
    """A probe trained and validated on ``null_labels`` (content-free labels)."""
    y_train, y_val = null_labels(train_ids, rate, seed), null_labels(val_ids, rate, seed)
    if not y_train.any() or y_train.all():
        return {"skipped": "null labels drew a single class on train"}
    probe = fit_logistic(x_train, y_train, l2)
    val = classification_metrics(probe.scores(x_val), y_val, 0.0)
    train = classification_metrics(probe.scores(x_train), y_train, 0.0)
    return {"rate": rate, "val_auc": val["auc"], "val_balanced_accuracy": val["balanced_accuracy"],
            "train_balanced_accuracy": train["balanced_accuracy"]}


def held_out_category_control(x_train: torch.Tensor, train: PromptSet, x_val: torch.Tensor, val: PromptSet, l2: float = 1e-2) -> dict:
    """Harmful-vs-(harmless + look-alike) probes, each trained without one harm category.

    Per held-out category ``h``: recall at logit 0 on ``h``'s validation prompts
    (``held_out_recall``) and on the other categories' (``seen_recall``), the
    false-positive rate on validation non-harmful prompts, and the AUC of ``h`` vs them.
    """
    train_harmful = torch.tensor([p.kind == "harmful" for p in train])
    val_harmful = torch.tensor([p.kind == "harmful" for p in val])
    val_negative = torch.tensor([p.kind in (HARMLESS, LOOKALIKE) for p in val])
    per_category = {}
    for held in train.filter(kind="harmful").categories():
        keep = torch.tensor([p.category != held for p in train])
        probe = fit_logistic(x_train[keep], train_harmful[keep], l2)
        scores = probe.scores(x_val)
        is_held = torch.tensor([p.category == held for p in val])
        seen = val_harmful & ~is_held
        if not is_held.any():
            continue
        per_category[held] = {
            "held_out_recall": float((scores[is_held] > 0).float().mean()),
            "seen_recall": float((scores[seen] > 0).float().mean()) if seen.any() else float("nan"),
            "false_positive_rate": float((scores[val_negative] > 0).float().mean()),
            "held_out_auc": roc_auc(scores[is_held | val_negative], is_held[is_held | val_negative]),
            "n_val_held_out": int(is_held.sum()),
        }
    rows = list(per_category.values())
    return {
        "per_category": per_category,
        "held_out_recall_mean": sum(r["held_out_recall"] for r in rows) / max(1, len(rows)),
        "seen_recall_mean": sum(r["seen_recall"] for r in rows) / max(1, len(rows)),
    }


# ------------------------------------------------------------------------ routing


def _hidden(output) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def force_token(logits: torch.Tensor, rows: torch.Tensor, token: int) -> torch.Tensor:
    """Logits [batch, seq, vocab] whose last position, for ``rows`` [batch] bool, is a point
    mass on ``token`` (0 there, ``FORCED_FLOOR`` elsewhere); other entries are unchanged."""
    out = logits.clone()
    rows = rows.to(logits.device)
    last = out[:, -1]
    forced = torch.full_like(last, FORCED_FLOOR)
    forced[:, token] = 0.0
    out[:, -1] = torch.where(rows[:, None], forced, last)
    return out


class RoutedReplyHooks:
    """Per-sequence routing to a fixed reply (use as a context manager).

    On the prompt pass of each ``model.generate`` call (or any plain forward call) a
    subclass sets ``mask`` [batch] bool; for those rows the output logits of every
    decoding step ``t`` are forced to ``reply_ids[t]`` (``reply_ids`` ends with EOS, which
    is repeated once the reply is used up). ``history`` keeps each prompt pass's mask.
    Subclasses may add hooks (``_extra_hooks``) and rewrite the logits (``_route``).
    """

    def __init__(self, model: torch.nn.Module, reply_ids: Sequence[int]) -> None:
        if not reply_ids:
            raise CdeltaError("the refusal reply has no tokens", "give a non-empty refusal reply")
        self.model = model
        self.reply_ids = [int(t) for t in reply_ids]
        self.mask: torch.Tensor | None = None
        self.history: list[torch.Tensor] = []
        self.step = 0
        self._prompt_pass = False
        self._prompt_mask: torch.Tensor | None = None
        self._handles: list = []

    def _extra_hooks(self) -> list:
        return []

    def _route(self, logits: torch.Tensor) -> torch.Tensor:
        """Subclass hook on every output; on the prompt pass (``self._prompt_pass``) it may set ``mask``."""
        return logits

    def _set_mask(self, mask: torch.Tensor) -> None:
        self.mask = mask.detach().cpu()
        self.history.append(self.mask)

    def _on_model_call(self, _module, _args, kwargs):
        if is_prompt_pass(kwargs):
            self.mask, self.step, self._prompt_pass = None, 0, True
            self._prompt_mask = kwargs.get("attention_mask")
        return None

    def _on_model_output(self, _module, _args, output):
        logits = output.logits if hasattr(output, "logits") else output[0]
        logits = self._route(logits)
        self._prompt_pass = False
        if self.mask is not None and bool(self.mask.any()):
            if self.mask.shape[0] != logits.shape[0]:
                raise CdeltaError(
                    f"router mask has {self.mask.shape[0]} rows but the batch has {logits.shape[0]}",
                    "generate one sequence per prompt (no beams / num_return_sequences) with the router attached",
                )
            logits = force_token(logits, self.mask, self.reply_ids[min(self.step, len(self.reply_ids) - 1)])
        self.step += 1
        if hasattr(output, "logits"):
            output.logits = logits
            return output
        return (logits,) + tuple(output[1:])

    def __enter__(self):
        try:
            self._handles.append(self.model.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
            self._handles += self._extra_hooks()
            self._handles.append(self.model.register_forward_hook(self._on_model_output))
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._prompt_pass = False
        self._prompt_mask = None


def reply_token_ids(tokenizer, reply: str) -> list[int]:
    """Token ids of ``reply`` (no special tokens) followed by EOS: what a forced reply emits."""
    if tokenizer.eos_token_id is None:
        raise CdeltaError("the tokenizer has no EOS token", "use a chat tokenizer with an eos_token")
    return tokenizer(reply, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def scripted_refusal(category: str, seed: int = 0) -> str:
    """One project refusal reply for ``category`` (seeded draw from its pool and the generic one)."""
    from cdelta.data.builtin import refusal_replies

    replies = refusal_replies()
    pool = list(replies.get(category, [])) + list(replies["generic"])
    return random.Random(f"{seed}:{category}").choice(pool)


def pool_activations(hidden: torch.Tensor, attention_mask: torch.Tensor | None, position: Position) -> torch.Tensor:
    """Pooled prompt activation [batch, d] (float32) from hidden [batch, seq, d], as ``collect_prompt_activations``."""
    return masked_mean(hidden, attention_mask) if position == "mean" else hidden[:, int(position)].float()


@dataclass
class ProbeRouter:
    """A category probe at ``layer``/``position`` and the refusal reply it routes to.

    A sequence is flagged when ``weight·pooled + bias > threshold`` (logit units).
    ``reply_ids`` are the reply's token ids plus EOS (``reply_token_ids``).
    """

    category: str
    layer: int
    position: Position
    weight: torch.Tensor
    bias: float
    threshold: float
    reply: str
    reply_ids: list[int]
    info: dict = field(default_factory=dict)

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        return LinearProbe(self.weight, self.bias).scores(acts)

    def fires(self, scores: torch.Tensor) -> torch.Tensor:
        return scores > self.threshold

    @torch.no_grad()
    def prompt_scores(self, model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
        """Probe logit per prompt on the unhooked model, shape [len(prompts)]."""
        acts = collect_prompt_activations(model, tokenizer, prompts, [self.layer], (self.position,), batch_size)
        return self.scores(acts[self.position][0])

    def attach(self, model: torch.nn.Module) -> RouterHooks:
        """Context manager: ``with router.attach(model) as hooks: generate(...)``; ``hooks.mask`` after a call."""
        return RouterHooks(self, model)

    def to_json(self) -> dict:
        meta = asdict(self)
        meta.pop("weight")
        return meta

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"weight": self.weight.float().contiguous()}, str(path), metadata={"router": json.dumps(self.to_json(), default=str)})

    @classmethod
    def load(cls, path: Path) -> ProbeRouter:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["router"])
            weight = handle.get_tensor("weight")
        return cls(weight=weight, **meta)


class RouterHooks(RoutedReplyHooks):
    """``RoutedReplyHooks`` whose mask comes from the probe at the router's layer on the prompt pass."""

    def __init__(self, router: ProbeRouter, model: torch.nn.Module) -> None:
        n_layers = architecture_of(model).n_layers
        if not 0 <= router.layer < n_layers:
            raise CdeltaError(f"router layer {router.layer} out of range for a {n_layers}-layer model", "fit the router on this model")
        super().__init__(model, router.reply_ids)
        self.router = router
        self.scores: torch.Tensor | None = None

    def _extra_hooks(self) -> list:
        return [decoder_layers(self.model)[self.router.layer].register_forward_hook(self._on_probe_layer)]

    def _on_probe_layer(self, _module, _args, output):
        if self._prompt_pass and self.mask is None:
            pooled = pool_activations(_hidden(output), self._prompt_mask, self.router.position)
            self.scores = self.router.scores(pooled).cpu()
            self._set_mask(self.router.fires(self.scores))
        return None


# ------------------------------------------------------------------- fit router


def probe_sets(prompts: PromptSet, split: str, per_category: int | None, seed: int) -> PromptSet:
    """Harmful, harmless and look-alike prompts of ``split`` (at most ``per_category`` each)."""
    part = prompts.filter(split=split, kind=["harmful", HARMLESS, LOOKALIKE])
    return limit_per_category(part, per_category, seed)


def fit_probe_router(
    lm,
    prompts: PromptSet,
    category: str,
    seed: int = 0,
    layers: Sequence[int] | None = None,
    positions: Sequence[Position] = PROBE_POSITIONS,
    l2: float = 1e-2,
    n_permutations: int = 20,
    per_category: int | None = None,
    reply: str | None = None,
) -> ProbeRouter:
    """Fit the ``category`` probe, choose its layer/position and threshold, run the controls.

    Train split: probes per candidate (layer, position) (layers default: all), on all
    harmful, harmless and look-alike prompts (at most ``per_category`` per category).
    Validation split: the highest AUC picks (layer, position) (ties: earlier layer,
    then the first position), the F1 optimum picks the threshold. ``info`` holds the
    selection table, validation metrics at the threshold and at logit 0 (with false-positive
    rates per contrast group), a one-vs-rest probe per harm category at the chosen
    (layer, position), and the three controls (module docstring). ``reply`` defaults to
    ``scripted_refusal(category, seed)``.
    """
    model, tokenizer = lm.model, lm.tokenizer
    started = time.perf_counter()
    harm = prompts.filter(kind="harmful").categories()
    if category not in harm:
        raise CdeltaError(f"no harmful prompts of category {category!r}", f"use one of: {', '.join(harm)}")
    layers = list(range(architecture_of(model).n_layers)) if layers is None else list(layers)
    positions = list(positions)
    train, val = probe_sets(prompts, "train", per_category, seed), probe_sets(prompts, "val", per_category, seed)
    y_train = torch.tensor([p.category == category for p in train])
    y_val = torch.tensor([p.category == category for p in val])
    if not (y_train.any() and y_val.any()):
        raise CdeltaError(f"the probe for {category!r} needs target prompts in the train and val splits", "use a prompt set with all splits")
    acts_train = collect_prompt_activations(model, tokenizer, train.texts(), layers, positions)
    acts_val = collect_prompt_activations(model, tokenizer, val.texts(), layers, positions)

    selection = []
    for pos in positions:
        for i, layer in enumerate(layers):
            probe = fit_logistic(acts_train[pos][i], y_train, l2)
            selection.append({"layer": layer, "position": pos, "val_auc": roc_auc(probe.scores(acts_val[pos][i]), y_val),
                              "train_auc": roc_auc(probe.scores(acts_train[pos][i]), y_train)})
    best = max(selection, key=lambda row: (row["val_auc"], -layers.index(row["layer"]), -positions.index(row["position"])))
    index, pos = layers.index(best["layer"]), best["position"]
    x_train, x_val = acts_train[pos][index], acts_val[pos][index]
    probe = fit_logistic(x_train, y_train, l2)
    val_scores = probe.scores(x_val)
    threshold = best_f1_threshold(val_scores, y_val)

    groups = {"other_harmful": [p.kind == "harmful" and p.category != category for p in val],
              HARMLESS: [p.kind == HARMLESS for p in val], LOOKALIKE: [p.kind == LOOKALIKE for p in val]}
    fired = val_scores > threshold
    val_metrics = {**classification_metrics(val_scores, y_val, threshold),
                   "false_positive_rate_by_group": {g: float(fired[torch.tensor(m)].float().mean()) for g, m in groups.items() if any(m)}}
    per_category_probes = {}
    for other in harm:
        y_tr, y_va = torch.tensor([p.category == other for p in train]), torch.tensor([p.category == other for p in val])
        if y_tr.any() and y_va.any():
            scores = fit_logistic(x_train, y_tr, l2).scores(x_val)
            per_category_probes[other] = {"val_auc": roc_auc(scores, y_va), "val_balanced_accuracy": classification_metrics(scores, y_va, 0.0)["balanced_accuracy"]}
    info = {
        "seed": seed,
        "l2": l2,
        "n_train": len(train),
        "n_train_target": int(y_train.sum()),
        "n_val": len(val),
        "n_val_target": int(y_val.sum()),
        "selection": selection,
        "train": classification_metrics(probe.scores(x_train), y_train, 0.0),
        "val": val_metrics,
        "val_at_zero": classification_metrics(val_scores, y_val, 0.0),
        "per_category": per_category_probes,
        "controls": {
            "permutation": permutation_control(x_train, y_train, x_val, y_val, val_metrics["auc"], n_permutations, seed, l2),
            "null_labels": null_label_control(x_train, [p.id for p in train], x_val, [p.id for p in val], float(y_train.float().mean()), seed, l2),
            "held_out_category": held_out_category_control(x_train, train, x_val, val, l2),
        },
    }
    info["seconds"] = time.perf_counter() - started
    reply = reply if reply is not None else scripted_refusal(category, seed)
    return ProbeRouter(category=category, layer=best["layer"], position=pos, weight=probe.weight, bias=probe.bias,
                       threshold=threshold, reply=reply, reply_ids=reply_token_ids(tokenizer, reply), info=info)
