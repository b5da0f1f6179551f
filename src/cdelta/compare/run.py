"""``cdelta compare``: fit every method, evaluate each the same way on the test split, one table.

For each method (the base first): fit it on the train/val prompts (timed), evaluate it with
``evaluate_model`` on the test split (its hooks entered around the whole evaluation), and
measure its generation throughput against the base, interleaved, in the same process.
Each evaluated row is cached in ``OUT/<method>/row.json`` keyed by a fingerprint of its
inputs and reused unless ``refit``. Writes ``compare.json``, ``compare.md`` and
``compare.html`` into ``OUT``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cdelta.compare import base as contract
from cdelta.compare.base import Method, MethodContext, MethodResult
from cdelta.compare.shared import param_count, prompts_digest
from cdelta.data.prompts import HARMLESS, LOOKALIKE, PromptSet
from cdelta.errors import CdeltaError
from cdelta.evaluate import EvalConfig, RefusalStat, evaluate_model, first_token_kl, limit_per_category, next_token_logprobs
from cdelta.io import atomic_write_json, provenance
from cdelta.models.chat import encode_chat
from cdelta.models.loading import LoadedModel
from cdelta.stages import run_stage

Log = Callable[[str], None]
BASE = "base"
SPLIT = "test"
SHARED_DIR = "shared"
GROUPS = ("target", "other_harmful", "harmless", "lookalike")
"""Pooled refusal groups of a row: the target category, the other harm categories, harmless, look-alike."""


@dataclass
class SpeedConfig:
    """Throughput measurement: ``repeats`` interleaved (base, method) pairs of greedy generation
    of exactly the evaluation's ``max_new_tokens`` for one batch of ``batch_size`` val prompts."""

    batch_size: int = 8
    repeats: int = 3


def resolve_methods(names: list[str]) -> list[Method]:
    """The registered methods called ``names`` (``all`` = every one), the base first, no repeats."""
    known = contract.available_methods()
    wanted = list(known) if "all" in names else [n.strip() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown:
        raise CdeltaError(f"unknown method {', '.join(map(repr, unknown))}", f"use 'all' or some of: {', '.join(known)}")
    if BASE not in known:
        raise CdeltaError("no 'base' method is registered", f"restore {contract.METHOD_PACKAGE}.base")
    return [known[n] for n in dict.fromkeys([BASE, *wanted])]


def check_category(category: str, prompts: PromptSet | None = None) -> None:
    """CdeltaError unless ``category`` is a harm category of ``prompts`` (default: the builtin set)."""
    from cdelta.data.builtin import load_builtin

    harmful = (prompts or load_builtin()).filter(kind="harmful").categories()
    if category not in harmful:
        raise CdeltaError(f"unknown category {category!r}", f"use one of: {', '.join(harmful)}")


# --------------------------------------------------------------------------- measuring


def _hooks(result: MethodResult):
    """The method's runtime hooks as a context manager (a no-op for weight methods)."""
    return result.hooks(result.model) if result.hooks else nullcontext()


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@torch.no_grad()
def _weights_checksum(model: torch.nn.Module) -> tuple[float, float]:
    """(Σθ, Σ‖θ‖) over parameter tensors, in float64: detects a method that edited the base model in place."""
    total = sum(p.sum(dtype=torch.float64).item() for p in model.parameters())
    norms = sum(torch.linalg.vector_norm(p, dtype=torch.float64).item() for p in model.parameters())
    return total, norms


@torch.no_grad()
def generation_speed(
    model: torch.nn.Module, tokenizer, prompts: list[str], max_new_tokens: int, hooks: Callable | None = None
) -> float:
    """Tokens per second of one greedy ``generate`` of exactly ``max_new_tokens`` new tokens for
    the batch ``prompts`` (EOS suppressed so every model does the same work); ``hooks(model)``
    is entered around it."""
    batch = encode_chat(tokenizer, prompts, next(model.parameters()).device)
    with hooks(model) if hooks else nullcontext():
        start = time.perf_counter()
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
            temperature=None, top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id,
        )
        seconds = time.perf_counter() - start
    return out[:, batch["input_ids"].shape[1]:].numel() / seconds


def speed_vs_base(
    base: torch.nn.Module, result: MethodResult, tokenizer, prompts: list[str], max_new_tokens: int, repeats: int
) -> dict:
    """Throughput of ``result`` (hooks on) relative to ``base`` (hooks off): one warm-up each, then
    ``repeats`` interleaved pairs; ``ratio`` is the median of the per-pair ratios, with their range."""
    def base_run() -> float:
        return generation_speed(base, tokenizer, prompts, max_new_tokens)

    def method_run() -> float:
        return generation_speed(result.model, tokenizer, prompts, max_new_tokens, result.hooks)

    base_run(), method_run()
    pairs = [(base_run(), method_run()) for _ in range(repeats)]
    ratios = [m / b for b, m in pairs]
    return {
        "tokens_per_s": statistics.median(m for _, m in pairs),
        "base_tokens_per_s": statistics.median(b for b, _ in pairs),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "repeats": repeats,
        "batch_size": len(prompts),
        "max_new_tokens": max_new_tokens,
    }


def group_stats(cells: dict[str, dict], category: str) -> dict[str, dict]:
    """Pooled refusal (rate, n, refusals, Wilson 95% CI) of each of ``GROUPS`` from per-category cells."""
    def pooled(select: Callable[[str, dict], bool], kind: str) -> dict:
        chosen = [c for name, c in cells.items() if select(name, c)]
        stat = RefusalStat(sum(c["refusals"] for c in chosen), sum(c["n"] for c in chosen), kind,
                           sum(c.get("garbled", 0) for c in chosen))
        return stat.to_json()

    return {
        "target": pooled(lambda name, c: name == category, "harmful"),
        "other_harmful": pooled(lambda name, c: c["kind"] == "harmful" and name != category, "harmful"),
        "harmless": pooled(lambda name, c: c["kind"] == HARMLESS, HARMLESS),
        "lookalike": pooled(lambda name, c: c["kind"] == LOOKALIKE, LOOKALIKE),
    }


class _Reference:
    """The base model's first-token log-probabilities on the KL prompts, computed once, lazily."""

    def __init__(self, lm: LoadedModel, texts: list[str]) -> None:
        self.lm, self.texts, self._logprobs = lm, texts, None

    def logprobs(self) -> torch.Tensor:
        if self._logprobs is None:
            self._logprobs = next_token_logprobs(self.lm.model, self.lm.tokenizer, self.texts)
        return self._logprobs


# --------------------------------------------------------------------------- one row


@dataclass
class _Job:
    """What every row of one comparison shares."""

    lm: LoadedModel
    category: str
    prompts: PromptSet
    out_dir: Path
    seed: int
    eval_config: EvalConfig
    speed: SpeedConfig
    options: dict
    refit: bool
    log: Log
    reference: _Reference
    speed_prompts: list[str]
    total_params: int

    def key(self, method: Method) -> dict:
        return {
            "method": method.name, "model_sha256": self.lm.weights_sha256, "category": self.category, "seed": self.seed,
            "eval": asdict(self.eval_config), "speed": asdict(self.speed), "options": self.options,
            "prompts": prompts_digest(self.prompts),
        }


def _evaluate(job: _Job, method: Method, base_perplexity: float | None) -> dict:
    """Fit ``method``, evaluate it on the test split, time its generation; the row (also written)."""
    lm, name = job.lm, method.name
    context = MethodContext(
        lm, job.prompts.filter(split=["train", "val"]), job.category, job.seed, job.out_dir / name,
        job.refit, job.log, dict(job.options), shared_dir=job.out_dir / SHARED_DIR,
    )
    reference = job.reference.logprobs()  # from the base, before any method can touch it
    checksum, hooks_before = _weights_checksum(lm.model), _hook_count(lm.model)
    job.log(f"{name}: fitting")
    start = time.perf_counter()
    result = method.fit(context)
    fit_seconds = time.perf_counter() - start
    job.log(f"{name}: fitted in {fit_seconds:.1f} s; evaluating on the {SPLIT} split")
    start = time.perf_counter()
    with _hooks(result):
        evaluation = evaluate_model(result.model, lm.tokenizer, [job.prompts], job.eval_config, progress=False)
        logprobs = next_token_logprobs(result.model, lm.tokenizer, job.reference.texts)
    speed = speed_vs_base(lm.model, result, lm.tokenizer, job.speed_prompts, job.eval_config.max_new_tokens, job.speed.repeats)
    eval_seconds = time.perf_counter() - start
    if _hook_count(lm.model) != hooks_before:
        raise CdeltaError(f"method {name!r} left hooks on the base model", "return them from MethodResult.hooks as a context manager that removes them")
    if _weights_checksum(lm.model) != checksum:
        raise CdeltaError(f"method {name!r} changed the base model's weights in place", "edit a copy.deepcopy of context.lm.model")

    cells = evaluation["sets"][job.prompts.name]
    utility = evaluation["utility"]
    perplexity = utility["perplexity"]
    row = {
        "method": name,
        "summary": method.summary,
        "needs_refusing_base": method.needs_refusing_base,
        **group_stats(cells, job.category),
        "per_category": cells,
        **({"contexts": {name: group_stats(ctx["sets"][job.prompts.name], job.category)
                         for name, ctx in evaluation["contexts"].items()}} if "contexts" in evaluation else {}),
        "perplexity": perplexity,
        "perplexity_ratio": perplexity / (base_perplexity or perplexity),
        "first_token_kl": first_token_kl(reference, logprobs),
        "kl_prompts": len(job.reference.texts),
        "mmlu_accuracy": utility.get("mmlu_accuracy"),
        "params_touched": result.params_touched,
        "params_fraction": result.params_touched / job.total_params,
        "runtime_hooks": result.runtime_hooks,
        "speed": speed,
        "tokens_per_s_ratio": speed["ratio"],
        "fit_seconds": fit_seconds + float(result.info.get("reused_seconds", 0.0)),
        "eval_seconds": eval_seconds,
        "info": result.info,
    }
    atomic_write_json(job.out_dir / name / "evaluation.json", evaluation)
    path = job.out_dir / name / "row.json"
    atomic_write_json(path, row)
    job.log(f"{name}: target refusal {row['target']['refusal_rate']:.1%}, harmless {row['harmless']['refusal_rate']:.1%}, "
            f"tokens/s ×{speed['ratio']:.2f} ({eval_seconds:.0f} s)")
    return json.loads(path.read_text())  # exactly what a resumed run will load


def _row(job: _Job, method: Method, base_perplexity: float | None) -> dict:
    """The cached row of ``method`` if its inputs are unchanged (and not ``refit``), else a new one."""
    path = job.out_dir / method.name / "row.json"
    if job.refit:
        path.unlink(missing_ok=True)
    return run_stage(
        job.out_dir, f"row-{method.name}", job.key(method), [f"{method.name}/row.json"],
        lambda: _evaluate(job, method, base_perplexity), lambda: json.loads(path.read_text()), job.log,
    )


def with_deltas(rows: list[dict]) -> list[dict]:
    """Rows with ``base_rate`` and ``delta_vs_base`` (method − base, as fractions) in each group."""
    base = rows[0]
    out = []
    for row in rows:
        row = {**row}
        for group in GROUPS:
            base_rate = base[group]["refusal_rate"]
            row[group] = {**row[group], "base_rate": base_rate, "delta_vs_base": row[group]["refusal_rate"] - base_rate}
        out.append(row)
    return out


# --------------------------------------------------------------------------- entry point


def compare(
    lm: LoadedModel,
    category: str,
    methods: list[str],
    out_dir: Path,
    seed: int = 0,
    eval_config: EvalConfig | None = None,
    refit: bool = False,
    log: Log = print,
    options: dict | None = None,
    speed: SpeedConfig | None = None,
) -> dict:
    """Compare ``methods`` (plus the base) on ``category``; returns what ``compare.json`` holds.

    ``eval_config.split`` must be ``"test"``; methods only see the train and val splits.
    ``options`` are passed to every method (``MethodContext.options``).
    """
    from cdelta.compare.report import write_reports
    from cdelta.data.builtin import load_builtin

    eval_config = eval_config or EvalConfig(seed=seed)
    if eval_config.split != SPLIT:
        raise CdeltaError(f"compare evaluates on the {SPLIT} split, got {eval_config.split!r}", f"use EvalConfig(split={SPLIT!r})")
    if getattr(eval_config, "backend", "transformers") != "transformers":
        raise CdeltaError("compare evaluates in-memory edited models and runtime hooks, which only the transformers backend runs",
                          "use EvalConfig(backend='transformers')")
    chosen = resolve_methods(methods)
    prompts = load_builtin()
    check_category(category, prompts)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if refit:
        shutil.rmtree(out_dir / SHARED_DIR, ignore_errors=True)
    speed = speed or SpeedConfig()
    test = limit_per_category(prompts.filter(split=SPLIT), eval_config.limit_per_category, eval_config.seed)
    kl_texts = test.filter(kind=HARMLESS).texts()[: eval_config.kl_prompts]
    job = _Job(
        lm, category, prompts, out_dir, seed, eval_config, speed, dict(options or {}), refit, log,
        _Reference(lm, kl_texts), prompts.filter(split="val").sample(speed.batch_size, seed).texts(), param_count(lm.model),
    )
    rows: list[dict] = []
    for method in chosen:
        rows.append(_row(job, method, rows[0]["perplexity"] if rows else None))
    result = {
        "meta": provenance(
            seed, lm.name, lm.weights_sha256, category=category, split=SPLIT, methods=[m.name for m in chosen],
            eval=asdict(eval_config), speed=asdict(speed), options=job.options, params_total=job.total_params,
        ),
        "category": category,
        "rows": with_deltas(rows),
    }
    atomic_write_json(out_dir / "compare.json", result)
    write_reports(result, out_dir)
    return result
