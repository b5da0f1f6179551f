"""Atomic file output and run provenance (seed, versions, base-model hash)."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same directory and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def _version(dist: str) -> str:
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions of Python and the libraries whose behaviour affects results."""
    libs = ("cdelta", "torch", "transformers", "safetensors", "numpy", "optuna")
    return {"python": platform.python_version(), **{lib: _version(lib) for lib in libs}}


def provenance(seed: int, model_name: str, weights_sha256: str, **extra) -> dict:
    """Metadata stamped into every output: seed, versions, base model and its hash."""
    return {
        "seed": seed,
        "model": model_name,
        "weights_sha256": weights_sha256,
        "versions": versions(),
        "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:]),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }
