"""Prompt sets: the project's own, public sets shipped on PyPI, and user files."""
