"""Research scripts behind docs/results.md and docs/gated.md (run from the repository root: python -m experiments.NAME)."""
