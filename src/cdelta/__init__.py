"""cdelta: circuit-restricted weight arithmetic (C-Δθ) for selective refusal.

The Python API mirrors the CLI: ``load_model``, ``localize``, ``edit``, ``export``,
``evaluate`` (see ``cdelta.api``). They are bound after the submodules of the same
names (``cdelta.edit``, ``cdelta.evaluate``) are imported, so the functions win.
"""

__version__ = "0.1.0"

from cdelta.api import edit, evaluate, export, load_model, localize  # noqa: E402

__all__ = ["load_model", "localize", "edit", "export", "evaluate", "__version__"]
