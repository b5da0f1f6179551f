"""The contract between ``cdelta compare`` and the methods it compares.

A method is a module in ``cdelta.compare.methods`` that defines ``METHOD = Method(...)``.
Its ``fit`` receives a ``MethodContext`` (the base model, the project prompts with their
splits, the target category) and returns a ``MethodResult``: the model to evaluate and,
for runtime methods, a factory of hooks attached around generation. Methods fit on the
train split, make every choice on the validation split, and never read the test split or
HarmBench; ``cdelta compare`` evaluates all of them the same way on the test split.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cdelta.data.prompts import PromptSet
from cdelta.errors import CdeltaError
from cdelta.models.loading import LoadedModel

METHOD_PACKAGE = "cdelta.compare.methods"


@dataclass
class MethodContext:
    """What a method may use to fit itself.

    ``lm`` is the base model: a method must not modify it in place (``copy.deepcopy`` the
    model before editing weights). ``out_dir`` is the method's own artifact directory
    (cache fitted vectors there; reuse them when ``refit`` is false). ``shared_dir`` holds
    artifacts several methods reuse (the refusal direction, the C-Δθ run; see
    ``cdelta.compare.shared``); ``cdelta compare --refit`` clears it once per run, and
    None means ``out_dir``.
    """

    lm: LoadedModel
    prompts: PromptSet
    category: str
    seed: int
    out_dir: Path
    refit: bool = False
    log: Callable[[str], None] = print
    options: dict = field(default_factory=dict)
    shared_dir: Path | None = None


@dataclass
class MethodResult:
    """A fitted method, ready to evaluate.

    ``model`` is generated from as is; when ``hooks`` is set, ``hooks(model)`` is entered
    around every forward pass of the evaluation (runtime steering). ``params_touched``
    counts changed parameter entries (0 for hook-only methods). ``info`` is the method's
    JSON-serialisable detail (layers, thresholds, validation scores, probe accuracy...).
    """

    model: torch.nn.Module
    params_touched: int
    hooks: Callable[[torch.nn.Module], AbstractContextManager] | None = None
    info: dict = field(default_factory=dict)

    @property
    def runtime_hooks(self) -> bool:
        return self.hooks is not None


@dataclass(frozen=True)
class Method:
    """A named method: ``fit(context) -> MethodResult``; ``summary`` is one line for the table legend."""

    name: str
    summary: str
    fit: Callable[[MethodContext], MethodResult]
    needs_refusing_base: bool = False


def available_methods() -> dict[str, Method]:
    """Every ``METHOD`` defined by a module of ``cdelta.compare.methods``, by name."""
    package = importlib.import_module(METHOD_PACKAGE)
    found: dict[str, Method] = {}
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{METHOD_PACKAGE}.{info.name}")
        method = getattr(module, "METHOD", None)
        if isinstance(method, Method):
            found[method.name] = method
    return dict(sorted(found.items()))


def get_method(name: str) -> Method:
    """The method called ``name``; a clear error naming the known ones otherwise."""
    methods = available_methods()
    if name not in methods:
        raise CdeltaError(f"unknown method {name!r}", f"use one of: {', '.join(methods)}")
    return methods[name]
