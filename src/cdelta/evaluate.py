"""Evaluation: refusal per prompt set and category with Wilson intervals, and utility.

Refusal is measured in one or more deployment contexts (``data.contexts``): ``plain``
(one user turn, greedy) fills the top-level tables; every other context gets its own
tables under ``contexts``, and ``context_range`` gives each cell's lowest and highest
rate across contexts (the worst case for a target is its lowest rate, for any other
cell its highest).

Utility is measured three ways: perplexity on a fixed public-domain text, MMLU
accuracy on a fixed sample (letter scoring), and first-token KL on harmless prompts
against a reference model.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdelta.config import default_of
from cdelta.data.contexts import PLAIN, SAMPLED, SAMPLING, Sampling, contextualize, harmless_requests
from cdelta.data.prompts import HARM_CATEGORIES, HARMLESS, LOOKALIKE, Prompt, PromptSet
from cdelta.generation import generate
from cdelta.judge.reply import read_replies
from cdelta.models.chat import encode_chat, reply_start_logits


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval for ``k`` successes out of ``n`` (as fractions)."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return (min(low, p), max(high, p))


@dataclass
class RefusalStat:
    """Refusal and garbled-reply counts of one (prompt set, category) cell (a mean over
    sampling seeds in a sampled context, so they may be fractional)."""

    refusals: float
    n: int
    kind: str
    garbled: float = 0

    @property
    def rate(self) -> float:
        return self.refusals / self.n if self.n else float("nan")

    def to_json(self) -> dict:
        lo, hi = wilson_interval(self.refusals, self.n)
        return {"refusal_rate": self.rate, "n": self.n, "refusals": self.refusals, "ci95": [lo, hi], "kind": self.kind,
                "garbled_rate": self.garbled / self.n if self.n else float("nan"), "garbled": self.garbled}


FIELD = "lookalike-field"
"""Kind of the cells that split a set's look-alikes by the harm category whose field
they come from (``lookalike:cybercrime``); pooled rates leave them out (no double count)."""


def field_cell_name(category: str) -> str:
    """Name of the cell of the look-alikes from harm ``category``'s field: ``lookalike:<category>``."""
    return f"{LOOKALIKE}:{category}"


def field_cell(prompt: Prompt) -> str | None:
    """``field_cell_name`` of a look-alike from a harm category's field, else None."""
    if prompt.kind == LOOKALIKE and prompt.source_category in HARM_CATEGORIES:
        return field_cell_name(prompt.source_category)
    return None


def refusal_stats(prompts: PromptSet, refused: list[bool], garbled: list[bool] | None = None) -> dict[str, RefusalStat]:
    """Per-category refusal (and garbled-reply) counts for judged prompts (same order as
    ``prompts``), plus one ``FIELD`` cell per harm category the look-alikes come from."""
    cells: dict[str, RefusalStat] = {}
    for prompt, is_refusal, is_garbled in zip(prompts, refused, garbled or [False] * len(prompts)):
        keys = [(prompt.category, prompt.kind)] + ([(field, FIELD)] if (field := field_cell(prompt)) else [])
        for key, kind in keys:
            cell = cells.setdefault(key, RefusalStat(0, 0, kind))
            cell.n += 1
            cell.refusals += int(is_refusal)
            cell.garbled += int(is_garbled)
    return cells


def judge_generations(
    model: torch.nn.Module,
    tokenizer,
    prompts: PromptSet,
    judge,
    max_new_tokens: int = 48,
    batch_size: int = 16,
    progress: bool = True,
    backend: str = "transformers",
) -> tuple[list[str], list[bool]]:
    """Generate greedily for every prompt (``cdelta.generation`` backend) and judge each
    completion's opening (the edit's own quick selection checks use this)."""
    completions = generate(
        model, tokenizer, prompts.chats(), max_new_tokens, batch_size, progress, description=f"{prompts.name}", backend=backend
    )
    refused = [judge.is_refusal(p.text, c) for p, c in zip(prompts, completions)]
    return completions, refused


def pooled_rate(stats: dict[str, dict[str, RefusalStat]], kind: str) -> dict:
    """Refusal pooled over every set's cells of one ``kind`` (e.g. harmless)."""
    cells = [c for by_category in stats.values() for c in by_category.values() if c.kind == kind]
    return RefusalStat(sum(c.refusals for c in cells), sum(c.n for c in cells), kind, sum(c.garbled for c in cells)).to_json()


@torch.no_grad()
def perplexity(model: torch.nn.Module, tokenizer, text: str, window: int = 512) -> float:
    """Token perplexity of ``text`` in non-overlapping windows of ``window`` tokens."""
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    total_nll, total_tokens = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1].unsqueeze(0).to(device)
        if chunk.shape[1] < 2:
            break
        logits = model(chunk[:, :-1]).logits.float()
        nll = F.cross_entropy(logits[0], chunk[0, 1:], reduction="sum")
        total_nll += nll.item()
        total_tokens += chunk.shape[1] - 1
    return math.exp(total_nll / total_tokens)


def _mmlu_prompt(item: dict) -> str:
    """A zero-shot multiple-choice prompt asking for a single letter."""
    options = "\n".join(f"{letter}. {item[f'answer_{letter.lower()}']}" for letter in "ABCD")
    return f"{item['question']}\n\n{options}\n\nAnswer with the letter of the correct option only."


@torch.no_grad()
def mmlu_accuracy(model: torch.nn.Module, tokenizer, items: list[dict], batch_size: int = 16) -> float:
    """Fraction of items whose highest-scoring letter token (A–D) at the reply start is correct.

    Items are batched in order of prompt length (less padding; the score does not depend on order).
    """
    device = next(model.parameters()).device
    letter_ids = [tokenizer.encode(letter, add_special_tokens=False)[0] for letter in "ABCD"]
    ordered = sorted(((_mmlu_prompt(item), item) for item in items), key=lambda pair: len(pair[0]))
    correct = 0
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        batch = encode_chat(tokenizer, [prompt for prompt, _ in chunk], device)
        logits = model(**batch, logits_to_keep=1).logits[:, -1, letter_ids]
        predicted = logits.argmax(-1).tolist()
        correct += sum("ABCD"[p] == item["correct_answer"].strip().upper() for p, (_, item) in zip(predicted, chunk))
    return correct / len(items)


def next_token_logprobs(model: torch.nn.Module, tokenizer, prompts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Log-probabilities of the first reply token, shape [n_prompts, vocab], float32 on CPU."""
    return F.log_softmax(reply_start_logits(model, tokenizer, prompts, batch_size).float(), -1)


def first_token_kl(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """Mean KL(reference ‖ model) of first-token distributions, in nats."""
    return F.kl_div(logprobs, reference_logprobs, log_target=True, reduction="batchmean").item()


def summarize(stats: dict[str, dict[str, RefusalStat]]) -> dict:
    """JSON tables per set and category, plus pooled harmless and look-alike refusal."""
    tables = {name: {cat: cell.to_json() for cat, cell in cells.items()} for name, cells in stats.items()}
    by_kind = defaultdict(dict)
    for kind in ("harmful", HARMLESS, LOOKALIKE):
        pooled = pooled_rate(stats, kind)
        if pooled["n"]:
            by_kind[kind] = pooled
    return {"sets": tables, "pooled": dict(by_kind)}


def limit_per_category(prompts: PromptSet, limit: int | None, seed: int = 0) -> PromptSet:
    """At most ``limit`` prompts per category, chosen by a seeded hash (all when None)."""
    if limit is None:
        return prompts
    kept = []
    for category in prompts.categories():
        kept += prompts.filter(category=category).sample(limit, seed).prompts
    return PromptSet(prompts.name, kept)


@dataclass
class EvalConfig:
    """What ``evaluate_model`` measures; the CLI flags mirror these fields. ``contexts``:
    names from ``data.contexts.CONTEXTS`` (``plain`` is always measured)."""

    split: str = "test"
    judge: str = default_of("judge")
    max_new_tokens: int = default_of("max_new_tokens")
    batch_size: int = default_of("eval_batch_size")
    limit_per_category: int | None = None
    mmlu_n: int = 100
    ppl_chars: int = 20000
    kl_prompts: int = 64
    seed: int = 0
    backend: str = "transformers"
    contexts: tuple[str, ...] = (PLAIN,)


def eval_config(cfg, split: str = "test") -> EvalConfig:
    """The before/after evaluation's settings of run ``cfg`` (a ``RunConfig``) on ``split``."""
    return EvalConfig(split, cfg.judge, cfg.max_new_tokens, cfg.eval_batch_size, cfg.eval_limit, cfg.mmlu_n, seed=cfg.seed,
                      contexts=tuple(cfg.eval_contexts))


def sampled_names(sampling: Sampling = SAMPLING) -> list[str]:
    """Result names of the sampled context, one per temperature (``sampled-t0.7``)."""
    return [f"{SAMPLED}-t{t:g}" for t in sampling.temperatures]


def _judged(model, tokenizer, sets: list[PromptSet], judge, config: EvalConfig, progress: bool, label: str = "",
            temperature: float = 0.0, seed: int = 0) -> tuple[dict[str, dict[str, RefusalStat]], dict[str, list[dict]]]:
    """Per-set refusal cells and generation records of ``sets`` (already in their context),
    each reply read whole (``judge.reply``: refusal, garbled, kind) over the opening judge."""
    stats, generations = {}, {}
    for prompts in sets:
        completions = generate(model, tokenizer, prompts.chats(), config.max_new_tokens, config.batch_size, progress,
                               description=f"{prompts.name}{label}", backend=config.backend,
                               temperature=temperature, top_p=SAMPLING.top_p, seed=seed)
        verdicts = read_replies(judge, prompts.texts(), completions)
        stats[prompts.name] = refusal_stats(prompts, [v.refusal for v in verdicts], [v.garbled for v in verdicts])
        generations[prompts.name] = [
            {"id": p.id, "category": p.category, "prompt": p.text, "completion": c, "refusal": v.refusal, "reply": v.kind,
             **({"context": [list(m) for m in p.context]} if p.context else {})}
            for p, c, v in zip(prompts, completions, verdicts)
        ]
    return stats, generations


def _mean_stats(runs: list[dict[str, dict[str, RefusalStat]]]) -> dict[str, dict[str, RefusalStat]]:
    """Cells whose refusals are the mean over ``runs`` (same prompts, other sampling seeds)."""
    return {name: {cat: RefusalStat(sum(run[name][cat].refusals for run in runs) / len(runs), cell.n, cell.kind,
                                    sum(run[name][cat].garbled for run in runs) / len(runs))
                   for cat, cell in cells.items()} for name, cells in runs[0].items()}


def evaluate_contexts(model, tokenizer, sets: list[PromptSet], harmless: list[str], config: EvalConfig, judge,
                      progress: bool = True) -> dict[str, dict]:
    """``{context: {"sets", "pooled", "generations"}}`` for every context of ``config``
    but ``plain``; ``sets`` are already split and limited, ``harmless`` the requests a
    same-turn conversation may put first. A sampled context has one entry per
    temperature, each the mean over ``SAMPLING.seeds`` (its generations from the first seed)."""
    out = {}
    for context in config.contexts:
        if context == PLAIN:
            continue
        if context == SAMPLED:
            for temperature, name in zip(SAMPLING.temperatures, sampled_names()):
                runs = [_judged(model, tokenizer, sets, judge, config, progress, f" [{name} seed {seed}]", temperature, seed)
                        for seed in SAMPLING.seeds]
                out[name] = {**summarize(_mean_stats([stats for stats, _ in runs])), "generations": runs[0][1],
                             "sampling": {"temperature": temperature, "top_p": SAMPLING.top_p, "seeds": list(SAMPLING.seeds)}}
            continue
        placed = [contextualize(prompts, context, config.split, config.seed, harmless) for prompts in sets]
        stats, generations = _judged(model, tokenizer, placed, judge, config, progress, f" [{context}]")
        out[context] = {**summarize(stats), "generations": generations}
    return out


def context_range(plain: dict, contexts: dict[str, dict]) -> dict:
    """Per set and category, the lowest and highest refusal rate over plain and every
    context: ``{set: {category: {"min": [context, rate], "max": [context, rate]}}}``."""
    tables = {PLAIN: plain["sets"], **{name: result["sets"] for name, result in contexts.items()}}
    out: dict[str, dict] = {}
    for name, cells in plain["sets"].items():
        out[name] = {}
        for category in cells:
            rates = [(context, table[name][category]["refusal_rate"]) for context, table in tables.items()]
            out[name][category] = {"min": list(min(rates, key=lambda r: r[1])), "max": list(max(rates, key=lambda r: r[1]))}
    return out


def evaluate_model(
    model: torch.nn.Module,
    tokenizer,
    prompt_sets: list[PromptSet],
    config: EvalConfig,
    reference: tuple[torch.nn.Module, object] | None = None,
    progress: bool = True,
) -> dict:
    """Refusal tables for every prompt set (plain, and in each context of ``config``),
    pooled rates, utility, and all generations.

    ``reference`` is (model, tokenizer) used for first-token KL on harmless prompts.
    """
    from cdelta.data.public import load_mmlu, load_ppl_text
    from cdelta.judge import get_judge

    judge = get_judge(config.judge)
    chosen = [limit_per_category(prompts.filter(split=config.split), config.limit_per_category, config.seed) for prompts in prompt_sets]
    stats, generations = _judged(model, tokenizer, chosen, judge, config, progress)
    harmless_texts = [p.text for prompts in chosen for p in prompts if p.kind == HARMLESS]
    utility: dict[str, float | int | None] = {
        "perplexity": perplexity(model, tokenizer, load_ppl_text(config.ppl_chars)),
        "ppl_chars": config.ppl_chars,
    }
    if config.mmlu_n:
        utility["mmlu_accuracy"] = mmlu_accuracy(model, tokenizer, load_mmlu(config.mmlu_n, config.seed))
        utility["mmlu_n"] = config.mmlu_n
    if reference is not None:
        ref_model, ref_tokenizer = reference
        utility["reference_perplexity"] = perplexity(ref_model, ref_tokenizer, load_ppl_text(config.ppl_chars))
        utility["perplexity_ratio"] = utility["perplexity"] / utility["reference_perplexity"]
    if reference is not None and harmless_texts:
        texts = harmless_texts[: config.kl_prompts]
        utility["first_token_kl"] = first_token_kl(
            next_token_logprobs(ref_model, ref_tokenizer, texts), next_token_logprobs(model, tokenizer, texts)
        )
        utility["kl_prompts"] = len(texts)
    results = {**summarize(stats), "utility": utility, "generations": generations}
    if any(context != PLAIN for context in config.contexts):
        harmless = sorted({text for prompts in prompt_sets for text in harmless_requests(prompts, config.split)})
        results["contexts"] = evaluate_contexts(model, tokenizer, chosen, harmless, config, judge, progress)
        results["context_range"] = context_range(results, results["contexts"])
    return results
