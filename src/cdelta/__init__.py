"""cdelta: circuit-restricted weight arithmetic (C-Δθ) for selective refusal."""

__version__ = "0.1.0"
