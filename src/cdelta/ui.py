"""Console verbosity shared by the CLI and long-running steps (progress bars, log lines)."""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_settings = {"quiet": False, "verbose": False}


def configure(quiet: bool = False, verbose: bool = False) -> None:
    """Set verbosity for this process (called once by the CLI)."""
    _settings.update(quiet=quiet, verbose=verbose)


def is_quiet() -> bool:
    return _settings["quiet"]


def is_verbose() -> bool:
    return _settings["verbose"]


def progress_bar(enabled: bool = True) -> Progress:
    """A transient rich progress bar on stderr, disabled when ``--quiet`` or ``enabled`` is False."""
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        transient=True, disable=is_quiet() or not enabled,
    )
