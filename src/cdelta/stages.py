"""Resumable pipeline stages: an artifact is reused when its inputs and config are unchanged."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from cdelta.errors import CdeltaError
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


REUSE_ERRORS = (CdeltaError, OSError, ValueError, KeyError, TypeError, IndexError, AttributeError)
"""What a damaged artifact makes ``load`` raise: the stage is then recomputed instead."""


def _record_of(path: Path) -> dict | None:
    """A stage record, or None when it is missing or damaged (the stage then runs again)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _output_digests(run_dir: Path, outputs: list[str]) -> dict[str, str]:
    return {o: file_digest(run_dir / o) for o in outputs if (run_dir / o).is_file()}


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
    with the same ``key`` left them all, unchanged; then return ``load()`` instead.

    The stage record (``.stages/NAME.json``: key, inputs, outputs and the outputs' sha256)
    is written only after ``compute`` succeeds, and every artifact is written to a
    temporary file and renamed, so an interrupted stage is recomputed next time and no
    stage reuses a half-written artifact. An output whose bytes differ from the record's
    sha256, a damaged record, or an output ``load`` cannot read is recomputed too.
    """
    record_path = run_dir / ".stages" / f"{name}.json"
    digest = fingerprint(key)
    record = _record_of(record_path)
    if record is not None and record.get("key") == digest and all((run_dir / o).exists() for o in outputs):
        recorded = record.get("sha256")
        changed = [o for o, d in _output_digests(run_dir, outputs).items() if isinstance(recorded, dict) and recorded.get(o) != d]
        if changed:
            log(f"{name}: {', '.join(changed)} changed since the stage wrote it; recomputing")
        else:
            try:
                result = load()
            except REUSE_ERRORS as exc:
                log(f"{name}: cannot reuse {', '.join(outputs)} ({exc.__class__.__name__}: {str(exc)[:200]}); recomputing")
            else:
                log(f"{name}: reusing {', '.join(outputs)} (inputs unchanged)")
                return result
    result = compute()
    atomic_write_json(record_path, {"key": digest, "inputs": key, "outputs": outputs, "sha256": _output_digests(run_dir, outputs)})
    return result


LOCK_NAME = ".lock"
_HELD: dict[str, list] = {}


@contextmanager
def exclusive_run_dir(run_dir: Path):
    """Hold ``run_dir/.lock`` (an OS lock, ``fcntl.flock``) while the block runs: a second
    ``cdelta run`` into the same directory fails at once with a ``CdeltaError``. The OS
    releases the lock when the holder exits, crashes or is killed. Re-entrant within a
    process (``run_pipeline`` inside a locked block)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield
        finally:
            _HELD[key][1] -= 1
        return
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    handle = open(run_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip()
            raise CdeltaError(
                f"run directory {run_dir} is in use by another cdelta run" + (f" (pid {holder})" if holder.isdigit() else ""),
                "wait for it to finish, or pass another --out",
            ) from None
        except OSError:
            pass  # a file system without locks: run unlocked
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        sweep_stale_temporaries(run_dir)
        _HELD[key] = [handle, 1]
        try:
            yield
        finally:
            del _HELD[key]
    finally:
        handle.close()


def sweep_stale_temporaries(run_dir: Path) -> list[Path]:
    """Remove what writers killed mid-write left in ``run_dir``: ``.NAME.*.tmp`` files of
    ``atomic_write_bytes`` and ``.checkpoint.*`` staging directories of the export. Only
    called while holding the run directory's lock, so no live writer owns them."""
    removed = []
    for path in sorted(run_dir.rglob(".*.tmp")):
        if path.is_file() and not path.is_symlink():
            path.unlink(missing_ok=True)
            removed.append(path)
    for path in sorted(run_dir.glob(".checkpoint.*")):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def locks_run_dir(function: Callable[..., T]) -> Callable[..., T]:
    """Decorator: ``function(cfg, run_dir, ...)`` runs holding ``exclusive_run_dir(run_dir)``."""

    @functools.wraps(function)
    def wrapper(cfg, run_dir, *args, **kwargs):
        with exclusive_run_dir(Path(run_dir)):
            return function(cfg, run_dir, *args, **kwargs)

    return wrapper


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
