"""Refusal tokens (Jain et al. 2024): one new vocabulary token per harm category, and a
probability threshold per category that decides refusal at generation time.

**Vocabulary.** The model's vocabulary (``V`` output rows) is extended by one token per
category, ``<|refuse:CATEGORY|>``, with ids ``V, V+1, …`` (appended rows; the tokenizer
gets the same ids on export). Tied embeddings are handled by
``resize_token_embeddings``: the new rows are then shared by input and output; untied
models get the mean input embedding as the new tokens' input rows (never used: the
tokens are never fed back, see below).

**What trains.** Only the ``k × d`` new output rows ``W``. Every old parameter is
untouched, so every old logit is bit-identical to the base model and the only new
quantity is, at the first reply position with final hidden state ``h`` [d] (after the
final norm) and base logits ``z`` [V]::

    log p(refuse_c | prompt) = W_c·h − logsumexp([z, W h])

The objective (the paper's "the token is the first reply token", restricted to the new
rows) is, per train prompt: ``−log p(refuse_c)`` for harmful prompts of category ``c``
and ``−log(1 − Σ_j p(refuse_j))`` for every other prompt (harmless, look-alike, harmful
categories without a token), each group weighted equally, plus ``l2/2 ·‖W·s‖²`` with
``s`` the RMS of the hidden-state entries. Because ``h`` and ``z`` do not depend on
``W``, the fine-tune runs on hidden states cached once (the gradients are exactly those
of fine-tuning the new rows of the resized model); the objective is convex and
minimised with full-batch L-BFGS from zero. The paper fine-tunes the whole model on
replies with the token prepended; training only the new rows is the variant that keeps
the base model exact, at the price of detecting from the last layer's last position only.

**Thresholds.** On the validation split each category's threshold ``τ_c`` on
``p(refuse_c)`` is the F1 optimum (category ``c`` vs every other prompt).

**Generation-time rule** (a runtime component; the exported checkpoint alone does not
apply it): on the first reply step compute ``p(refuse_c)`` for the categories to refuse;
if any exceeds its ``τ_c`` emit the scripted refusal reply; otherwise drop the refusal
tokens' logits (at every step) and generate normally. ``RefusalTokens.attach(model)``
implements it with forward hooks (``RoutedReplyHooks``); the logits it returns have the
base vocabulary, so downstream code sees base-sized distributions.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cdelta.baselines.probes import (
    RoutedReplyHooks,
    best_f1_threshold,
    classification_metrics,
    probe_sets,
    reply_token_ids,
    scripted_refusal,
)
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.directions.vectors import generation_position_ids
from cdelta.errors import CdeltaError
from cdelta.models.chat import encode_chat

TOKEN_FORMAT = "<|refuse:{}|>"
FILLER_FORMAT = "<|cdelta_unused_{}|>"


def _check_head(model: torch.nn.Module) -> None:
    config = getattr(model.config, "text_config", None) or model.config
    if getattr(config, "final_logit_softcapping", None):
        raise CdeltaError("refusal tokens do not support final-logit soft-capping models", "use a model without final_logit_softcapping")
    if getattr(model.get_output_embeddings(), "bias", None) is not None:
        raise CdeltaError("refusal tokens need an output head without bias", "use a model whose lm_head has no bias")


@torch.no_grad()
def reply_start_states(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden state at the last prompt position and the log partition of the model's logits there.

    Returns ``(states [n, d], log_z [n])`` (float32, CPU); position ids as ``model.generate``.
    """
    _check_head(model)
    device = next(model.parameters()).device
    head = model.get_output_embeddings()
    states, log_z = [], []
    for start in range(0, len(prompts), batch_size):
        batch = encode_chat(tokenizer, prompts[start : start + batch_size], device)
        out = model.get_decoder()(**batch, position_ids=generation_position_ids(batch["attention_mask"]), use_cache=False)
        last = out.last_hidden_state[:, -1]
        states.append(last.float().cpu())
        log_z.append(torch.logsumexp(head(last).float(), -1).cpu())
    return torch.cat(states), torch.cat(log_z)


def token_logprobs(states: torch.Tensor, log_z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``log p(refuse_j)`` [n, k] from states [n, d], base log partition [n] and new rows [k, d]."""
    new = states.float() @ rows.float().T
    total = torch.logsumexp(torch.cat([log_z[:, None].float(), new], 1), 1)
    return new - total[:, None]


def train_token_rows(states: torch.Tensor, log_z: torch.Tensor, targets: torch.Tensor, n_tokens: int,
                     l2: float = 1e-2, max_iter: int = 500) -> torch.Tensor:
    """New output rows [n_tokens, d] minimising the module-docstring objective.

    ``targets`` [n]: the token index for prompts that should emit a refusal token, −1 for
    prompts that should emit none. Every present group (token index or −1) carries the same
    total weight (all weights sum to 1).
    """
    scale = states.float().pow(2).mean().sqrt().clamp_min(1e-6)
    x = states.float() / scale
    groups = targets.unique()
    counts = {int(g): int((targets == g).sum()) for g in groups}
    weight = torch.tensor([1.0 / (len(groups) * counts[int(t)]) for t in targets])
    positive = targets >= 0
    w = torch.zeros(n_tokens, x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20,
                                  tolerance_grad=1e-8, tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logp = token_logprobs(x, log_z, w)
        log_none = log_z - torch.logsumexp(torch.cat([log_z[:, None], x @ w.T], 1), 1)  # log(1 − Σ_j p_j)
        chosen = logp.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
        loss = -(weight * torch.where(positive, chosen, log_none)).sum() + 0.5 * l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return (w.detach() / scale).clone()


@dataclass
class RefusalTokens:
    """Trained refusal-token rows and their thresholds.

    ``rows`` [k, d] are the new output rows for ``categories`` (token ids
    ``base_vocab + i``); ``thresholds`` are probabilities (refuse when
    ``p(refuse_c) > thresholds[c]``); ``replies``/``reply_ids`` the scripted refusal per
    category (ids: the reply's tokens plus EOS).
    """

    categories: list[str]
    base_vocab: int
    rows: torch.Tensor
    thresholds: dict[str, float]
    replies: dict[str, str]
    reply_ids: dict[str, list[int]]
    info: dict = field(default_factory=dict)

    @property
    def token_ids(self) -> list[int]:
        return [self.base_vocab + i for i in range(len(self.categories))]

    @property
    def token_strings(self) -> list[str]:
        return [TOKEN_FORMAT.format(c) for c in self.categories]

    def extend(self, model: torch.nn.Module) -> torch.nn.Module:
        """Resize ``model`` in place to ``base_vocab + k`` tokens and write the rows; returns it."""
        _check_head(model)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        if head.weight.shape[0] != self.base_vocab:
            raise CdeltaError(f"the model has {head.weight.shape[0]} output rows, the refusal tokens expect {self.base_vocab}",
                              "extend the base model the tokens were fitted on")
        tied = head.weight.data_ptr() == embed.weight.data_ptr()
        mean_input = embed.weight.detach().float().mean(0)
        model.resize_token_embeddings(self.base_vocab + len(self.categories), mean_resizing=False)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        with torch.no_grad():
            head.weight[self.base_vocab :] = self.rows.to(head.weight.dtype)
            if not tied:
                embed.weight[self.base_vocab :] = mean_input.to(embed.weight.dtype)
        return model

    def extended_copy(self, model: torch.nn.Module) -> torch.nn.Module:
        """A deep copy of the base ``model`` with the refusal tokens added."""
        return self.extend(copy.deepcopy(model))

    def attach(self, model: torch.nn.Module, categories: Sequence[str] | None = None,
               thresholds: dict[str, float] | None = None) -> RefusalTokenHooks:
        """Context manager applying the generation-time rule on an extended model.

        ``categories`` to refuse (default: all); ``thresholds`` override the fitted ones.
        """
        chosen = list(categories) if categories is not None else list(self.categories)
        unknown = [c for c in chosen if c not in self.categories]
        if unknown or not chosen:
            raise CdeltaError(f"no refusal token for {unknown or 'an empty category list'}", f"use some of: {', '.join(self.categories)}")
        return RefusalTokenHooks(self, model, chosen, {**self.thresholds, **(thresholds or {})})

    @torch.no_grad()
    def prompt_logprobs(self, model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
        """``log p(refuse_c)`` [n, k] at the first reply position of an extended model (no hooks)."""
        device = next(model.parameters()).device
        rows = []
        for start in range(0, len(prompts), batch_size):
            batch = encode_chat(tokenizer, prompts[start : start + batch_size], device)
            logits = model(**batch, position_ids=generation_position_ids(batch["attention_mask"]), logits_to_keep=1).logits[:, -1].float()
            rows.append(torch.log_softmax(logits, -1)[:, self.token_ids].cpu())
        return torch.cat(rows)

    def to_json(self) -> dict:
        meta = asdict(self)
        meta.pop("rows")
        return meta

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file({"rows": self.rows.float().contiguous()}, str(path), metadata={"refusal_tokens": json.dumps(self.to_json(), default=str)})

    @classmethod
    def load(cls, path: Path) -> RefusalTokens:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["refusal_tokens"])
            rows = handle.get_tensor("rows")
        return cls(rows=rows, **meta)


class RefusalTokenHooks(RoutedReplyHooks):
    """The generation-time rule as hooks on an extended model.

    Prompt pass: ``logprobs`` [batch, m] of the chosen categories' tokens (softmax over
    the extended vocabulary); a row is flagged when any exceeds its log-threshold and then
    gets the first chosen category's scripted reply. Every output's logits are cut to the
    base vocabulary (all refusal tokens suppressed), so unflagged rows see exactly the
    base model's logits.
    """

    def __init__(self, tokens: RefusalTokens, model: torch.nn.Module, categories: list[str], thresholds: dict[str, float]) -> None:
        vocab = model.get_output_embeddings().weight.shape[0]
        if vocab != tokens.base_vocab + len(tokens.categories):
            raise CdeltaError(f"the model has {vocab} output rows, not the extended {tokens.base_vocab + len(tokens.categories)}",
                              "attach to the extended model (tokens.extended_copy(model) or the exported checkpoint)")
        super().__init__(model, tokens.reply_ids[categories[0]])
        self.tokens = tokens
        self.ids = [tokens.token_ids[tokens.categories.index(c)] for c in categories]
        self.log_thresholds = torch.tensor([math.log(max(thresholds[c], 1e-45)) for c in categories])
        self.logprobs: torch.Tensor | None = None

    def _route(self, logits: torch.Tensor) -> torch.Tensor:
        if self._prompt_pass:
            logp = torch.log_softmax(logits[:, -1].float(), -1)[:, self.ids].cpu()
            self.logprobs = logp
            self._set_mask((logp > self.log_thresholds).any(-1))
        return logits[..., : self.tokens.base_vocab]


# ------------------------------------------------------------------------ fitting


def fit_refusal_tokens(
    lm,
    prompts: PromptSet,
    categories: Sequence[str] | None = None,
    seed: int = 0,
    l2: float = 1e-2,
    per_category: int | None = None,
    max_iter: int = 500,
) -> RefusalTokens:
    """Train one refusal token per category (default: every harm category) and pick thresholds.

    Train split (at most ``per_category`` prompts per category): harmful prompts of each
    category are that token's positives; harmless, look-alike and harmful prompts of
    categories without a token are negatives. Validation split: per-category F1-optimal
    probability threshold; ``info`` holds the validation metrics at it (recall, FPR,
    AUC, false-positive rate per contrast group) and the train metrics.
    """
    model, tokenizer = lm.model, lm.tokenizer
    started = time.perf_counter()
    harm = prompts.filter(kind="harmful").categories()
    categories = list(categories) if categories is not None else harm
    missing = [c for c in categories if c not in harm]
    if missing or not categories:
        raise CdeltaError(f"no harmful prompts of {missing or 'any category'}", f"use some of: {', '.join(harm)}")
    train, val = probe_sets(prompts, "train", per_category, seed), probe_sets(prompts, "val", per_category, seed)

    def targets(part: PromptSet) -> torch.Tensor:
        return torch.tensor([categories.index(p.category) if p.kind == "harmful" and p.category in categories else -1 for p in part])

    t_train, t_val = targets(train), targets(val)
    for i, category in enumerate(categories):
        if not (t_train == i).any() or not (t_val == i).any():
            raise CdeltaError(f"refusal token {category!r} needs harmful prompts in the train and val splits", "use a prompt set with all splits")
    states, log_z = reply_start_states(model, tokenizer, train.texts())
    rows = train_token_rows(states, log_z, t_train, len(categories), l2, max_iter)
    val_states, val_log_z = reply_start_states(model, tokenizer, val.texts())
    val_lp, train_lp = token_logprobs(val_states, val_log_z, rows), token_logprobs(states, log_z, rows)

    thresholds, per_category_info = {}, {}
    groups = {"other_harmful": torch.tensor([p.kind == "harmful" for p in val]), HARMLESS: torch.tensor([p.kind == HARMLESS for p in val]),
              LOOKALIKE: torch.tensor([p.kind == LOOKALIKE for p in val])}
    for i, category in enumerate(categories):
        y_val = t_val == i
        log_threshold = best_f1_threshold(val_lp[:, i], y_val)
        fired = val_lp[:, i] > log_threshold
        thresholds[category] = math.exp(log_threshold)
        per_category_info[category] = {
            "val": {**classification_metrics(val_lp[:, i], y_val, log_threshold),
                    "false_positive_rate_by_group": {g: float(fired[m & ~y_val].float().mean()) for g, m in groups.items() if (m & ~y_val).any()}},
            "train": classification_metrics(train_lp[:, i], t_train == i, log_threshold),
            "log_threshold": log_threshold,
        }
    replies = {c: scripted_refusal(c, seed) for c in categories}
    info = {"seed": seed, "l2": l2, "n_train": len(train), "n_val": len(val), "trained_entries": rows.numel(),
            "per_category": per_category_info, "seconds": time.perf_counter() - started}
    return RefusalTokens(
        categories=categories,
        base_vocab=model.get_output_embeddings().weight.shape[0],
        rows=rows,
        thresholds=thresholds,
        replies=replies,
        reply_ids={c: reply_token_ids(tokenizer, r) for c, r in replies.items()},
        info=info,
    )


# ------------------------------------------------------------------------- export


RULE = (
    "Generation-time rule: run the prompt, take the softmax of the first reply position over the "
    "full vocabulary; if p(<|refuse:C|>) > threshold[C] for a category C you refuse, reply with "
    "replies[C]; otherwise never emit the refusal tokens (suppress_tokens=token_ids) and generate normally."
)


def export_refusal_tokens(lm, tokens: RefusalTokens, out_dir: Path) -> Path:
    """Write ``out_dir``: the extended checkpoint and tokenizer, ``refusal_tokens.json`` and
    ``refusal_tokens.safetensors`` (for ``RefusalTokens.load``), and a README with the rule.

    The tokenizer gets the refusal tokens at ids ``base_vocab + i``; when it has fewer
    entries than the model's rows (e.g. Qwen2.5 pads its embedding), placeholder special
    tokens ``<|cdelta_unused_N|>`` fill the gap first.
    """
    out_dir = Path(out_dir)
    tokenizer = copy.deepcopy(lm.tokenizer)
    if len(tokenizer) > tokens.base_vocab:
        raise CdeltaError(f"the tokenizer has {len(tokenizer)} entries but the model only {tokens.base_vocab} rows", "export from a consistent model and tokenizer")
    fillers = [FILLER_FORMAT.format(i) for i in range(tokens.base_vocab - len(tokenizer))]
    tokenizer.add_tokens(fillers + tokens.token_strings, special_tokens=True)
    ids = tokenizer.convert_tokens_to_ids(tokens.token_strings)
    if ids != tokens.token_ids:
        raise CdeltaError(f"the tokenizer gave the refusal tokens ids {ids}, expected {tokens.token_ids}", "export with the base model's own tokenizer")
    model = tokens.extended_copy(lm.model)
    record = {
        "base_model": lm.name,
        "base_weights_sha256": lm.weights_sha256,
        "categories": tokens.categories,
        "tokens": dict(zip(tokens.categories, tokens.token_strings)),
        "token_ids": dict(zip(tokens.categories, tokens.token_ids)),
        "thresholds": tokens.thresholds,
        "replies": tokens.replies,
        "rule": RULE,
        "info": tokens.info,
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staging = Path(tmp) / "checkpoint"
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        tokens.save(staging / "refusal_tokens.safetensors")
        (staging / "refusal_tokens.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
        (staging / "README.md").write_text(
            f"# {lm.name} + refusal tokens ({', '.join(tokens.categories)})\n\n"
            "Made with cdelta (`cdelta.baselines.refusal_tokens`). The vocabulary has one extra token per category; "
            "all base weights are unchanged. It loads with plain transformers, but refusing needs a small "
            f"generation-time rule (or `RefusalTokens.load(...).attach(model)`).\n\n{RULE}\n\nSettings in `refusal_tokens.json`.\n"
        )
        if out_dir.exists():
            shutil.rmtree(out_dir)
        staging.rename(out_dir)
    return out_dir
