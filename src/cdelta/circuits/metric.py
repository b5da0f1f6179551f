"""Metrics for circuit attribution (pluggable).

A metric turns prompts into model inputs (``encode``) and the model's logits into one
number per prompt (``__call__`` → ``[n_examples]``); attribution differentiates the sum
over a batch and reports per-node scores averaged over examples. Larger = more refusal
(``logodds``, ``teacher-forced``) or more target-category evidence (``category``).

Three metrics are provided:

``logodds`` (default)
    Refusal log-odds of the *first reply token*, read at the last prompt position
    (left padding makes that position -1)::

        m = logsumexp_{t in R} log p(t) - logsumexp_{t in C} log p(t)

    ``R`` are the first tokens of refusal openers ("I'm sorry", "I cannot", "Sorry",
    "As an AI", "Unfortunately", ...) and ``C`` the first tokens of compliance openers
    ("Sure", "Here", "Certainly", "To", "The", "1", "Step", ...), each tokenized with no
    leading space (the reply starts right after the template's newline). Tokens present
    in both sets are dropped from both. Choice: the refuse-or-answer decision is made at
    the first reply token, it needs one forward pass, and it is differentiable; the
    price is that ``R`` is dominated by the generic token "I" for many tokenizers (as
    in most refusal-direction work), so the metric measures "starts like a refusal".

``teacher-forced``
    Mean per-token log-probability of a fixed refusal reply (default "I'm sorry, but I
    can't help with that.") minus that of a fixed compliance reply (default "Sure, here
    is how to do that:"), both teacher-forced after the prompt. Each prompt becomes two
    rows (prompt + refusal, prompt + compliance); the reply tokens are appended after
    the prompt so that left padding still aligns both runs of a clean/corrupted pair
    from the end. Slower (two rows, longer sequences) but less dependent on one token.

``category`` (for bases that do not refuse)
    Category evidence at the output, fitted from data (``fit_category_metric``): with
    ``μ_T`` / ``μ_C`` the mean last-position log-softmax of target-category prompts and of
    contrast prompts (``[vocab]``), ``d = μ_T − μ_C`` projected onto the zero-sum subspace
    (``d − mean(d)·1``) and ``u = d / ‖d‖``::

        m = <log_softmax(logits[-1]) − (μ_T + μ_C)/2, u>

    so the fit prompts' metric means are ``±‖d‖/2`` and larger = more target-category.
    Because ``u ⟂ 1``, the log-normaliser drops out: ``m = <logits[-1], u> − b`` with
    ``b = <(μ_T + μ_C)/2, u>`` (how ``CategoryMetric`` computes it), and since ``logits = W_U·norm(h)``
    this is a linear probe on the normalised final residual with direction ``W_Uᵀu``: it
    measures how much category evidence reaches the output. The zero-sum projection
    only removes the shift that log-softmax is invariant to (it would otherwise mix the
    distribution's overall confidence into the metric). One row per prompt, one forward
    pass, linear in the logits (IG completeness is as for the other metrics). It cannot
    be built by name: ``get_metric`` takes the fitted instance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from cdelta.errors import CdeltaError
from cdelta.models.chat import format_chat, reply_start_logits

REFUSAL_OPENERS = ("I'm sorry", "I cannot", "I can't", "Sorry", "I won't", "As an AI", "Unfortunately")
"""Phrases whose first token starts a refusal."""

COMPLIANCE_OPENERS = ("Sure", "Here", "Certainly", "To", "The", "1", "Step", "Great", "Of course", "Yes")
"""Phrases whose first token starts a compliant answer."""

REFUSAL_REPLY = "I'm sorry, but I can't help with that."
COMPLIANCE_REPLY = "Sure, here is how to do that:"

METRICS = ("logodds", "teacher-forced", "category")
FITTED_METRICS = ("category",)
"""Metrics fitted from prompts (``localize`` fits them itself; ``get_metric`` cannot build them by name)."""

TOP_TOKENS = 10
"""Tokens with the largest positive and negative weight in a category direction, kept for its description."""


@dataclass
class Encoded:
    """Model inputs for a list of prompts, as built by a metric.

    ``input_ids``/``attention_mask``: ``[rows, seq]``, left-padded, so every row ends at
    position -1. ``row_example[r]`` is the prompt index of row ``r`` (one row per prompt
    for ``logodds``, two for ``teacher-forced``). ``suffix_ids[r]`` are the reply tokens
    appended after the prompt in row ``r`` (empty for ``logodds``).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    row_example: torch.Tensor
    n_examples: int
    suffix_ids: list[list[int]]

    @property
    def lengths(self) -> torch.Tensor:
        """Real (non-pad) tokens per row."""
        return self.attention_mask.sum(dim=1)

    def to(self, device) -> Encoded:
        return Encoded(self.input_ids.to(device), self.attention_mask.to(device), self.row_example.to(device), self.n_examples, self.suffix_ids)


def _pad_id(tokenizer) -> int:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id
    return int(pad if pad is not None else 0)


def encode_rows(tokenizer, prompts: list[str], suffixes: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Chat-formatted, left-padded ``input_ids``/``attention_mask`` with optional appended token ids.

    Without suffixes this equals ``cdelta.models.chat.encode_chat`` (same rendering, no
    special tokens added). Suffix ids are concatenated after the prompt's own tokens, so
    the prompt tokenization never changes at the boundary.
    """
    rendered = format_chat(tokenizer, prompts)
    rows = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in rendered]
    if suffixes is not None:
        rows = [list(r) + list(s) for r, s in zip(rows, suffixes)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), _pad_id(tokenizer), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids, mask


def encode_prompts(tokenizer, prompts: list[str]) -> Encoded:
    """One left-padded row per prompt, no suffix (metrics read position -1 only)."""
    ids, mask = encode_rows(tokenizer, prompts)
    n = len(prompts)
    return Encoded(ids, mask, torch.arange(n), n, [[] for _ in range(n)])


def _full_precision(logits: torch.Tensor) -> torch.Tensor:
    """Half-precision logits upcast to float32; float32/float64 kept as they are."""
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def first_token_ids(tokenizer, phrases: tuple[str, ...] | list[str]) -> list[int]:
    """Distinct first token ids of ``phrases`` (tokenized without special tokens), in order."""
    ids = []
    for phrase in phrases:
        toks = tokenizer(phrase, add_special_tokens=False)["input_ids"]
        if toks:
            ids.append(int(toks[0]))
    return list(dict.fromkeys(ids))


def opener_token_sets(
    tokenizer,
    refusal: tuple[str, ...] | list[str] = REFUSAL_OPENERS,
    compliance: tuple[str, ...] | list[str] = COMPLIANCE_OPENERS,
) -> tuple[list[int], list[int]]:
    """Refusal and compliance first-token ids, deduplicated, with shared tokens dropped from both."""
    r_ids, c_ids = first_token_ids(tokenizer, refusal), first_token_ids(tokenizer, compliance)
    shared = set(r_ids) & set(c_ids)
    r_ids = [t for t in r_ids if t not in shared]
    c_ids = [t for t in c_ids if t not in shared]
    if not r_ids or not c_ids:
        raise CdeltaError(
            "this tokenizer gives no distinct first tokens for refusal vs compliance openers",
            "use --metric teacher-forced",
        )
    return r_ids, c_ids


class Metric:
    """Base class: ``encode`` prompts, then ``__call__(logits, encoded) -> [n_examples]``.

    ``logits_to_keep`` is passed to the model so the LM head only runs on the last
    positions the metric reads.
    """

    name: str = "metric"
    logits_to_keep: int = 1

    def encode(self, tokenizer, prompts: list[str]) -> Encoded:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, logits: torch.Tensor, encoded: Encoded) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-able description for circuit files."""
        return {"name": self.name}


class LogOddsMetric(Metric):
    """Refusal log-odds of the first reply token (see module docstring)."""

    name = "logodds"
    logits_to_keep = 1

    def __init__(self, tokenizer, refusal=REFUSAL_OPENERS, compliance=COMPLIANCE_OPENERS) -> None:
        self.refusal_ids, self.compliance_ids = opener_token_sets(tokenizer, refusal, compliance)
        self.refusal_tokens = tokenizer.convert_ids_to_tokens(self.refusal_ids)
        self.compliance_tokens = tokenizer.convert_ids_to_tokens(self.compliance_ids)

    def encode(self, tokenizer, prompts: list[str]) -> Encoded:
        return encode_prompts(tokenizer, prompts)

    def __call__(self, logits: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        logp = torch.log_softmax(_full_precision(logits[:, -1, :]), dim=-1)
        r = torch.logsumexp(logp[:, self.refusal_ids], dim=-1)
        c = torch.logsumexp(logp[:, self.compliance_ids], dim=-1)
        return r - c

    def describe(self) -> dict:
        return {"name": self.name, "refusal_tokens": self.refusal_tokens, "compliance_tokens": self.compliance_tokens}


class TeacherForcedMetric(Metric):
    """Mean log-prob of a refusal reply minus that of a compliance reply (see module docstring)."""

    name = "teacher-forced"

    def __init__(self, tokenizer, refusal: str = REFUSAL_REPLY, compliance: str = COMPLIANCE_REPLY) -> None:
        self.refusal, self.compliance = refusal, compliance
        self.refusal_ids = list(tokenizer(refusal, add_special_tokens=False)["input_ids"])
        self.compliance_ids = list(tokenizer(compliance, add_special_tokens=False)["input_ids"])
        if not self.refusal_ids or not self.compliance_ids:
            raise CdeltaError("teacher-forced metric replies tokenize to nothing", "pass non-empty replies")
        self.logits_to_keep = max(len(self.refusal_ids), len(self.compliance_ids)) + 1

    def encode(self, tokenizer, prompts: list[str]) -> Encoded:
        n = len(prompts)
        suffixes = [self.refusal_ids] * n + [self.compliance_ids] * n
        ids, mask = encode_rows(tokenizer, list(prompts) * 2, suffixes)
        return Encoded(ids, mask, torch.arange(n).repeat(2), n, suffixes)

    def __call__(self, logits: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        keep = logits.shape[1]
        logp = torch.log_softmax(_full_precision(logits), dim=-1)
        means = []
        for r, suffix in enumerate(encoded.suffix_ids):
            c = len(suffix)
            # suffix token t sits at kept index keep - c + t and is predicted one position earlier
            pred = logp[r, keep - c - 1 : keep - 1, :]
            target = torch.tensor(suffix, device=logits.device)
            means.append(pred.gather(-1, target[:, None]).squeeze(-1).mean())
        per_row = torch.stack(means)
        n = encoded.n_examples
        return per_row[:n] - per_row[n:]

    def describe(self) -> dict:
        return {"name": self.name, "refusal_reply": self.refusal, "compliance_reply": self.compliance}


class CategoryMetric(Metric):
    """Category evidence ``<logits[-1], u> − bias`` along a fitted vocabulary direction (see module docstring).

    ``direction``: ``[vocab]``, unit norm, zero-sum; ``bias``: ``<(μ_T + μ_C)/2, u>``;
    ``provenance``: JSON-able facts about the fit (``fit_category_metric``).
    """

    name = "category"
    logits_to_keep = 1

    def __init__(self, direction: torch.Tensor, bias: float, provenance: dict) -> None:
        self.direction, self.bias, self.provenance = direction, float(bias), dict(provenance)

    def encode(self, tokenizer, prompts: list[str]) -> Encoded:
        return encode_prompts(tokenizer, prompts)

    def __call__(self, logits: torch.Tensor, encoded: Encoded) -> torch.Tensor:
        last = _full_precision(logits[:, -1, :])
        return last @ self.direction.to(device=last.device, dtype=last.dtype) - self.bias

    def describe(self) -> dict:
        return {"name": self.name, **self.provenance}


def _token_names(tokenizer, ids: list[int]) -> list[str]:
    """Token strings of ``ids``; ids past the tokenizer's vocabulary (padded LM-head rows) as ``<id N>``."""
    names = tokenizer.convert_ids_to_tokens(ids)
    return [name if isinstance(name, str) else f"<id {i}>" for i, name in zip(ids, names)]


def fit_category_metric(
    model: torch.nn.Module, tokenizer, target_texts: list[str], contrast_texts: list[str], batch_size: int = 8,
    on_batch: Callable[[], None] | None = None,
) -> CategoryMetric:
    """Fit the ``category`` metric: difference of mean last-position log-softmax, target minus contrast.

    Forward passes only (``ceil(n / batch_size)`` per group). ``provenance`` records the
    number of prompts per side, the separation on the fit data (``fit_gap`` = mean metric
    of target minus contrast prompts, which equals ``‖d‖``, and ``fit_gap_se``, the
    unpaired standard error) and the ``TOP_TOKENS`` most positive / negative tokens of the
    direction. Callers should evaluate the metric on other prompts too: on its fit data
    the gap is ``‖d‖ > 0`` by construction, even for random labels.
    """
    if len(target_texts) < 2 or len(contrast_texts) < 2:
        raise CdeltaError(
            f"the category metric needs at least 2 target and 2 contrast prompts to fit (got {len(target_texts)} and {len(contrast_texts)})",
            "pass at least 2 prompts per side",
        )
    target = torch.log_softmax(reply_start_logits(model, tokenizer, target_texts, batch_size, on_batch).double(), dim=-1)
    contrast = torch.log_softmax(reply_start_logits(model, tokenizer, contrast_texts, batch_size, on_batch).double(), dim=-1)
    mu_t, mu_c = target.mean(0), contrast.mean(0)
    d = mu_t - mu_c
    d = d - d.mean()
    norm = float(d.norm())
    if not norm > 0:
        raise CdeltaError("target and contrast prompts give the same mean next-token distribution", "use prompts that differ in category")
    u = d / norm
    bias = float((mu_t + mu_c) @ u / 2)
    m_t, m_c = target @ u - bias, contrast @ u - bias
    order = torch.argsort(u, descending=True)
    provenance = {
        "fit_n_target": len(target_texts),
        "fit_n_contrast": len(contrast_texts),
        "fit_gap": float(m_t.mean() - m_c.mean()),
        "fit_gap_se": float((m_t.var() / len(m_t) + m_c.var() / len(m_c)) ** 0.5),
        "top_target_tokens": _token_names(tokenizer, order[:TOP_TOKENS].tolist()),
        "top_contrast_tokens": _token_names(tokenizer, order.flip(0)[:TOP_TOKENS].tolist()),
    }
    return CategoryMetric(u, bias, provenance)


def get_metric(metric: str | Metric, tokenizer) -> Metric:
    """A metric instance from its name (``logodds`` | ``teacher-forced``) or an instance (e.g. a fitted ``CategoryMetric``)."""
    if isinstance(metric, Metric):
        return metric
    if metric == "logodds":
        return LogOddsMetric(tokenizer)
    if metric == "teacher-forced":
        return TeacherForcedMetric(tokenizer)
    if metric in FITTED_METRICS:
        raise CdeltaError(
            f"the '{metric}' metric is fitted from prompts and cannot be built by name here",
            "pass a fitted metric (cdelta.circuits.metric.fit_category_metric) or use localize(..., metric='category')",
        )
    raise CdeltaError(f"unknown metric '{metric}'", f"use one of: {', '.join(METRICS)}")
