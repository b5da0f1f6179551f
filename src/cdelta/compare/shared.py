"""Helpers the compared methods share: cached artifacts, the refusal direction fitted once
for CAST / ActAdd / ablation, the C-Δθ edit built once for C-Δθ and its controls, and
edited copies of the base model with an honest count of the entries they change.

Shared artifacts live in ``context.shared_dir`` (``OUT/shared`` under ``cdelta compare``,
which clears it once on ``--refit``); a method's own artifacts live in ``context.out_dir``
and are refitted when ``context.refit`` is set.
"""

from __future__ import annotations

import copy
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

import torch

from cdelta.compare.base import MethodContext
from cdelta.stages import file_digest, prompts_digest, run_stage

if TYPE_CHECKING:
    from cdelta.config import RunConfig
    from cdelta.directions import Direction
    from cdelta.pipeline import BuiltEdit

T = TypeVar("T")

DIRECTION_FILE = "direction.safetensors"
CDELTA_RUN_DIR = "cdelta-run"


def shared_dir(context: MethodContext) -> Path:
    """Where artifacts shared between methods are cached (``out_dir`` when none is given)."""
    return context.shared_dir or context.out_dir


def cached(
    directory: Path,
    name: str,
    key: dict,
    filename: str,
    compute: Callable[[Path], T],
    load: Callable[[Path], T],
    log: Callable[[str], None],
    refit: bool = False,
) -> T:
    """``compute(path)`` (which writes ``directory/filename``) unless an earlier call with the
    same ``key`` left it; then ``load(path)``. ``refit`` discards the cached file first."""
    return cached_with_status(directory, name, key, filename, compute, load, log, refit)[0]


def cached_with_status(
    directory: Path,
    name: str,
    key: dict,
    filename: str,
    compute: Callable[[Path], T],
    load: Callable[[Path], T],
    log: Callable[[str], None],
    refit: bool = False,
) -> tuple[T, bool]:
    """``cached``, also returning whether the value was reused from the cache (not computed)."""
    path = Path(directory) / filename
    if refit and path.is_dir():
        shutil.rmtree(path)
    elif refit:
        path.unlink(missing_ok=True)
    computed = False

    def run() -> T:
        nonlocal computed
        computed = True
        return compute(path)

    value = run_stage(Path(directory), name, key, [filename], run, lambda: load(path), log)
    return value, not computed


class FittedDirection(NamedTuple):
    """The shared refusal direction, its file's sha256 (to key what is built on it), and the
    seconds to charge a method that reused it (its fit time; 0 when fitted by this call)."""

    direction: Direction
    digest: str
    reused_seconds: float


def refusal_direction(context: MethodContext) -> FittedDirection:
    """``fit_refusal_direction`` on the train/val prompts, fitted once per model, seed, ``alpha``
    and ``direction_kwargs`` option and cached as ``shared_dir/direction.safetensors``."""
    from cdelta.directions import Direction, fit_refusal_direction

    alpha = float(context.options.get("alpha", 1.0))
    kwargs = dict(context.options.get("direction_kwargs") or {})
    key = {"model_sha256": context.lm.weights_sha256, "seed": context.seed, "alpha": alpha, "direction_kwargs": kwargs,
           "prompts": prompts_digest(context.prompts)}

    def compute(path: Path):
        context.log("refusal direction: fitting (train split; layer and position chosen on val)")
        direction = fit_refusal_direction(context.lm, context.prompts, seed=context.seed, alpha=alpha, **kwargs)
        direction.save(path)
        return direction

    directory = shared_dir(context)
    direction, reused = cached_with_status(directory, "direction", key, DIRECTION_FILE, compute, Direction.load, context.log)
    return FittedDirection(direction, file_digest(directory / DIRECTION_FILE), reused_seconds(direction.info, reused))


def reused_seconds(info: dict, reused: bool) -> float:
    """Fit seconds to charge for an artifact: its recorded ``info["seconds"]`` when loaded from
    the cache, 0 when fitted by this call (the caller's wall time already includes it)."""
    return float(info.get("seconds", 0.0)) if reused else 0.0


def direction_summary(direction: Direction) -> dict:
    """A direction's JSON description without the per-candidate validation scores."""
    return {k: v for k, v in direction.to_json().items() if k != "scores"}


def changed_entries(base: torch.nn.Module, edited: torch.nn.Module) -> int:
    """Parameter entries of ``edited`` that differ from ``base`` (state-dict names; a tensor the
    base lacks counts its nonzero entries, e.g. an ActAdd bias; an untied copy of a tied
    matrix with unchanged values counts nothing)."""
    reference = base.state_dict()
    total = 0
    for name, tensor in edited.state_dict().items():
        if not torch.is_floating_point(tensor):
            continue
        before = reference.get(name)
        total += int((tensor != 0).sum()) if before is None else int((tensor != before).sum())
    return total


def edited_copy(model: torch.nn.Module, edit: Callable[[torch.nn.Module], None]) -> tuple[torch.nn.Module, int]:
    """A deep copy of ``model`` with ``edit`` applied in place, and its number of changed entries."""
    edited = copy.deepcopy(model)
    edit(edited)
    return edited, changed_entries(model, edited)


def param_count(model: torch.nn.Module) -> int:
    """Distinct parameter entries of ``model`` (tied matrices counted once)."""
    return sum(p.numel() for p in model.parameters())


class CdeltaBuild(NamedTuple):
    """``pipeline.build_edit``'s output with the config and run directory that produced it."""

    cfg: RunConfig
    run_dir: Path
    built: BuiltEdit
    seconds: float


def cdelta_build(context: MethodContext) -> CdeltaBuild:
    """Localize → edit → choose k for the target category, resumable in ``shared_dir/cdelta-run``.

    The ``RunConfig`` is the defaults (or the TOML file of the ``config`` option) with this
    model, category and seed; any option whose key is a ``RunConfig`` field (``steps``,
    ``circuit``, ``k``, ``judge``...) overrides it. The ``run_dir`` option resumes the
    stages of an existing ``cdelta run`` directory made with the same settings.
    """
    from cdelta.pipeline import build_edit

    cfg, run_dir = cdelta_config(context), cdelta_run_dir(context)
    started = time.perf_counter()
    built = build_edit(cfg, run_dir, context.lm, context.log, prompts=context.prompts)
    return CdeltaBuild(cfg, run_dir, built, time.perf_counter() - started)


def cdelta_config(context: MethodContext) -> RunConfig:
    """The ``RunConfig`` of the shared C-Δθ build: the defaults (or the TOML file of the
    ``config`` option) with this model, category and seed, overridden by ``RunConfig`` options."""
    from cdelta.config import RunConfig, load_config_file, make_config

    fields = {k: v for k, v in context.options.items() if k in RunConfig.model_fields}
    file_values = load_config_file(Path(context.options["config"])) if "config" in context.options else {}
    return make_config(file_values, {**fields, "model": context.lm.name, "category": [context.category], "seed": context.seed})


def cdelta_run_dir(context: MethodContext) -> Path:
    """Where the shared C-Δθ build's stages live: the ``run_dir`` option, else ``shared_dir/cdelta-run``."""
    return Path(context.options["run_dir"]) if "run_dir" in context.options else shared_dir(context) / CDELTA_RUN_DIR
