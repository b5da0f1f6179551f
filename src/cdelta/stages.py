"""Resumable pipeline stages: an artifact is reused when its inputs and config are unchanged."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from cdelta.io import atomic_write_json

T = TypeVar("T")


def fingerprint(obj) -> str:
    """sha256 of a JSON-able object (keys sorted), the identity of a stage's inputs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def prompts_digest(prompts) -> str:
    """sha256 of every prompt's id, text, category, kind, split and context, when it has one
    (identity of a ``PromptSet``'s data)."""
    return fingerprint([(p.id, p.text, p.category, p.kind, p.split) + ((p.context,) if p.context else ())
                        for p in prompts])


def file_digest(path: Path) -> str:
    """sha256 of one artifact file, to chain stage keys."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def run_stage(
    run_dir: Path,
    name: str,
    key: dict,
    outputs: list[str],
    compute: Callable[[], T],
    load: Callable[[], T],
    log: Callable[[str], None] = lambda message: None,
) -> T:
    """Run ``compute`` (which writes ``outputs`` under ``run_dir``) unless a previous run
    with the same ``key`` left them all; then return ``load()`` instead.

    The stage record is written only after ``compute`` succeeds, so an interrupted
    stage is recomputed next time.
    """
    record = run_dir / ".stages" / f"{name}.json"
    digest = fingerprint(key)
    if record.is_file() and json.loads(record.read_text()).get("key") == digest and all((run_dir / o).exists() for o in outputs):
        log(f"{name}: reusing {', '.join(outputs)} (inputs unchanged)")
        return load()
    result = compute()
    atomic_write_json(record, {"key": digest, "inputs": key, "outputs": outputs})
    return result


def base_evaluation(lm, sets: list, eval_cfg, log: Callable[[str], None]) -> dict:
    """The base model's evaluation, shared by every run on the same weights.

    Kept in the user cache (``$CDELTA_CACHE_DIR/evals``, next to the model caches) under
    a fingerprint of the weights' sha256, the evaluation settings, every prompt of
    ``sets`` and the cdelta source itself (any code change recomputes it), so runs that
    differ only in their edit evaluate the base once.
    """
    from cdelta.evaluate import evaluate_model
    from cdelta.models.bundled import cache_root

    key = {"model_sha256": lm.weights_sha256, "eval": vars(eval_cfg), "code": source_digest(),
           "sets": [(s.name, prompts_digest(s)) for s in sets]}
    path = cache_root().parent / "evals" / f"{fingerprint(key)}.json"
    if path.exists():
        log(f"base evaluation reused from {path}")
        return json.loads(path.read_text())
    results = evaluate_model(lm.model, lm.tokenizer, sets, eval_cfg, (lm.model, lm.tokenizer))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, results)
    return results


def source_digest() -> str:
    """sha256 over the files of the installed ``cdelta`` package (code and bundled data)."""
    root = Path(__file__).parent
    files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    return fingerprint([(str(p.relative_to(root)), file_digest(p)) for p in files])
